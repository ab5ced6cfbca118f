// Command reqlat measures what single file-system requests cost in a
// directory: each line is one system call (or, for "untar-file", the
// calls tar makes for one file) repeated N times, in microseconds per
// call. Run natively it shows the local cost; run in a VM on a virtio-fs
// or 9p share it shows one request's round trip through the share, the
// figure that bounds metadata-heavy work such as unpacking a tree.
//
// usage: reqlat [-n N] DIR
//
// It only touches DIR/reqlat.*, which it removes at the end.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	n := flag.Int("n", 2000, "repetitions of each call")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: reqlat [-n N] DIR")
		os.Exit(2)
	}
	dir, err := os.MkdirTemp(flag.Arg(0), "reqlat.")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer os.RemoveAll(dir)
	if err := run(dir, *n); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
}

// measure prints the mean time of n calls of fn.
func measure(name string, n int, fn func(i int) error) error {
	start := time.Now()
	for i := 0; i < n; i++ {
		if err := fn(i); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	fmt.Printf("%-12s %8.1f us\n", name, float64(time.Since(start).Microseconds())/float64(n))
	return nil
}

func run(dir string, n int) error {
	f, link := filepath.Join(dir, "f"), filepath.Join(dir, "l")
	if err := os.WriteFile(f, make([]byte, 1<<20), 0o644); err != nil {
		return err
	}
	if err := os.Symlink("target", link); err != nil {
		return err
	}
	fd, err := unix.Open(f, unix.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	buf := make([]byte, 4096)
	files := filepath.Join(dir, "files")
	if err := os.Mkdir(files, 0o755); err != nil {
		return err
	}
	times := []unix.Timespec{{Sec: 1e9}, {Sec: 1e9}}
	for _, m := range []struct {
		name string
		fn   func(i int) error
	}{
		{"readlink", func(int) error { _, err := unix.Readlink(link, buf); return err }},
		{"fchmod", func(int) error { return unix.Fchmod(fd, 0o644) }},
		{"pread-4k", func(i int) error { _, err := unix.Pread(fd, buf, int64(i*37%256)*4096); return err }},
		{"lookup-miss", func(i int) error {
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(dir, "missing"+strconv.Itoa(i)), &st); err != unix.ENOENT {
				return fmt.Errorf("lstat of a missing file: %v", err)
			}
			return nil
		}},
		// What tar does for each file: create, write, close, set times.
		{"untar-file", func(i int) error {
			p := filepath.Join(files, strconv.Itoa(i))
			w, err := unix.Open(p, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY, 0o644)
			if err != nil {
				return err
			}
			if _, err := unix.Write(w, buf[:2048]); err != nil {
				unix.Close(w)
				return err
			}
			if err := unix.Close(w); err != nil {
				return err
			}
			return unix.UtimesNanoAt(unix.AT_FDCWD, p, times, 0)
		}},
	} {
		if err := measure(m.name, n, m.fn); err != nil {
			return err
		}
	}
	return nil
}
