package vm

import (
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

func TestBootPhases(t *testing.T) {
	ms := func(n int64) int64 { return n * int64(time.Millisecond) }
	d := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name          string
		hello, ready  vmproto.BootTimes
		helloAt, rdAt time.Duration
		want          BootPhases
	}{
		{
			name:    "every step measured",
			hello:   vmproto.BootTimes{Init: ms(1500), Modules: ms(1800), Hello: ms(1850)},
			ready:   vmproto.BootTimes{Config: ms(1900), Mounts: ms(2300), Ready: ms(2400)},
			helloAt: d(2350), rdAt: d(2950),
			want: BootPhases{QEMU: d(500), Kernel: d(1500), Modules: d(300), Port: d(50), Config: d(50),
				Mounts: d(400), Setup: d(100), Total: d(2950)},
		},
		{
			name:    "an older guest measures nothing",
			helloAt: d(2000), rdAt: d(2500),
			want: BootPhases{Total: d(2500)},
		},
		{
			name:    "clocks that disagree give zero, not a negative phase",
			hello:   vmproto.BootTimes{Init: ms(1500), Modules: ms(1400), Hello: ms(3000)},
			ready:   vmproto.BootTimes{Config: ms(2900)},
			helloAt: d(2000), rdAt: d(1000),
			want: BootPhases{Kernel: d(1500), Port: d(1600), Total: d(1000)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := bootPhases(t0, t0.Add(tt.helloAt), t0.Add(tt.rdAt), tt.hello, tt.ready)
			if got != tt.want {
				t.Fatalf("bootPhases =\n %+v\nwant\n %+v", got, tt.want)
			}
		})
	}
}

func TestBootPhasesFile(t *testing.T) {
	dir := t.TempDir()
	p := BootPhases{QEMU: time.Second, Total: 3 * time.Second, Start: time.Millisecond}
	if err := saveBootPhases(dir, p); err != nil {
		t.Fatal(err)
	}
	got, err := ReadBootPhases(dir)
	if err != nil || got != p {
		t.Fatalf("ReadBootPhases = %+v, %v; want %+v", got, err, p)
	}
}
