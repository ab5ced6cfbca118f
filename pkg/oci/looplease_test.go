package oci

import (
	"strings"
	"testing"
)

const testLeaseID = "0123456789abcdef0123456789abcdef"

func TestParseLoopLease(t *testing.T) {
	tests := []struct {
		in      string
		want    []string
		wantErr string
	}{
		{testLeaseID + ":loop3", []string{"loop3"}, ""},
		{testLeaseID + ":loop0 loop12", []string{"loop0", "loop12"}, ""},
		{testLeaseID, nil, "want"},
		{testLeaseID + ":", nil, "loop device name"},
		{testLeaseID + ":loop1 ", nil, "loop device name"},
		{testLeaseID + ":loop01", nil, "loop device name"},
		{testLeaseID + ":loop-1", nil, "loop device name"},
		{testLeaseID + ":/dev/loop1", nil, "loop device name"},
		{testLeaseID + ":loop1048576", nil, "loop device name"},
		{testLeaseID + ":loop1 loop1", nil, "twice"},
		{strings.ToUpper(testLeaseID) + ":loop1", nil, "hex"},
		{"abc:loop1", nil, "hex"},
		{testLeaseID + ":" + strings.Repeat("loop1 ", 300) + "loop1", nil, "at most"},
	}
	for _, tt := range tests {
		l, err := ParseLoopLease(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseLoopLease(%.60q) = %v, %v; want error with %q", tt.in, l, err, tt.wantErr)
			}
			continue
		}
		if err != nil || l.ID != testLeaseID || strings.Join(l.Devices, " ") != strings.Join(tt.want, " ") {
			t.Errorf("ParseLoopLease(%q) = %+v, %v; want %v", tt.in, l, err, tt.want)
		}
		if l.String() != tt.in {
			t.Errorf("String() = %q, want %q", l.String(), tt.in)
		}
	}
	s, err := ParseAnnotations(map[string]string{AnnotationLoopLease: testLeaseID + ":loop2"})
	if err != nil || s.LoopLease == nil || s.LoopLease.Devices[0] != "loop2" {
		t.Errorf("ParseAnnotations: %+v, %v", s.LoopLease, err)
	}
}

// FuzzParseLoopLease: any value either fails or parses into a lease that
// formats back to exactly the value (so nothing the parser accepts can be
// read two ways).
func FuzzParseLoopLease(f *testing.F) {
	f.Add(testLeaseID + ":loop3 loop5")
	f.Add(testLeaseID + ":loop0")
	f.Add(":")
	f.Fuzz(func(t *testing.T, v string) {
		l, err := ParseLoopLease(v)
		if err != nil {
			return
		}
		if l.String() != v {
			t.Fatalf("%q parsed as %+v, which formats as %q", v, l, l.String())
		}
		if len(l.Devices) == 0 || len(l.Devices) > maxLeaseDevices {
			t.Fatalf("%q: %d devices", v, len(l.Devices))
		}
	})
}
