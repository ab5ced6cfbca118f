package rootless

import "testing"

func TestIsIdentityMap(t *testing.T) {
	for m, want := range map[string]bool{
		"         0          0 4294967295\n": true,
		"0 1000 1\n1 100000 65536\n":         false,
		"0 1000 1":                           false,
		"":                                   false,
		"0 0 4294967294":                     false,
	} {
		if got := IsIdentityMap(m); got != want {
			t.Errorf("IsIdentityMap(%q) = %v, want %v", m, got, want)
		}
	}
}

func TestUserDirs(t *testing.T) {
	env := func(kv map[string]string) func(string) (string, bool) {
		return func(k string) (string, bool) { v, ok := kv[k]; return v, ok }
	}
	for _, tc := range []struct {
		env        map[string]string
		run, cache string
		err        bool
	}{
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}, "/run/user/1000/kiwi-shim", "/home/u/.cache/kiwi-shim", false},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_CACHE_HOME": "/c", "XDG_CONFIG_HOME": "/cf"}, "/run/user/1000/kiwi-shim", "/c/kiwi-shim", false},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_CACHE_HOME": "/c", "HOME": "/home/u"}, "/run/user/1000/kiwi-shim", "/c/kiwi-shim", false},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_CACHE_HOME": "rel", "HOME": "/home/u"}, "/run/user/1000/kiwi-shim", "/home/u/.cache/kiwi-shim", false},
		{map[string]string{"HOME": "/home/u"}, "", "", true},
		{map[string]string{"XDG_RUNTIME_DIR": "run"}, "", "", true},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000"}, "", "", true},
	} {
		d, err := UserDirs(env(tc.env), tc.env["HOME"])
		if (err != nil) != tc.err || d.Runtime != tc.run || d.Cache != tc.cache || (err == nil && d.Config == "") {
			t.Errorf("UserDirs(%v) = %+v, %v", tc.env, d, err)
		}
	}
}

func TestMappedIDs(t *testing.T) {
	for m, want := range map[string]uint64{
		"0 0 4294967295\n":           4294967295,
		"0 1000 1\n1 100000 65536\n": 65537,
		"0 1000 1":                   1,
		"":                           0,
		"garbage\n0 1 x\n":           0,
	} {
		if got := MappedIDs(m); got != want {
			t.Errorf("MappedIDs(%q) = %d, want %d", m, got, want)
		}
	}
}

func TestHostID(t *testing.T) {
	m := "0 1001 1\n1 300000 65536\n"
	for _, tc := range []struct {
		id   uint64
		want int
		ok   bool
	}{{0, 1001, true}, {1, 300000, true}, {1000, 300999, true}, {65536, 365535, true}, {65537, 0, false}} {
		got, ok := HostID(m, tc.id)
		if got != tc.want || ok != tc.ok {
			t.Errorf("HostID(%d) = %d, %v; want %d, %v", tc.id, got, ok, tc.want, tc.ok)
		}
	}
}
