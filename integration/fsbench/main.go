// Command fsbench times a file-system workload in a directory and prints
// one line per row: "NAME SECONDS". `make bench` runs the same static
// binary on virtio-fs and 9p shares inside a VM, on guest tmpfs, on a
// kiwi-sharefs mount, on go-fuse's loopback example and natively.
//
// usage: fsbench [-size MiB] [-files N] [-drop] DIR
//
// Rows: seq-write (SIZE MiB in 1 MiB writes, then fsync), seq-read (the
// same file, 1 MiB reads), rand-read (4 KiB reads at random aligned
// offsets, 20000 of them), untar (a generated tree of FILES files of 2
// KiB in 100 directories, unpacked with archive/tar the way tar does),
// find-stat (walk that tree and lstat every entry). With -drop it drops
// the page cache (as root) before the read rows, so that they measure the
// share, not the client's cache.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

func main() {
	size := flag.Int("size", 1024, "MiB for the sequential and random rows")
	files := flag.Int("files", 10000, "files in the tree")
	drop := flag.Bool("drop", false, "drop the page cache before reading")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: fsbench [-size MiB] [-files N] [-drop] DIR")
		os.Exit(2)
	}
	dir, err := os.MkdirTemp(flag.Arg(0), "fsbench.")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(dir)
	dropCaches := func() {
		if *drop {
			os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		}
	}
	big := filepath.Join(dir, "big")
	row("seq-write", func() error { return seqWrite(big, *size) })
	dropCaches()
	row("seq-read", func() error { return seqRead(big) })
	dropCaches()
	row("rand-read", func() error { return randRead(big, *size) })
	os.Remove(big)
	archive := makeTree(*files)
	tree := filepath.Join(dir, "tree")
	row("untar", func() error { return untar(archive, tree) })
	dropCaches()
	row("find-stat", func() error { return findStat(tree) })
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "fsbench:", err)
	os.Exit(1)
}

func row(name string, fn func() error) {
	start := time.Now()
	if err := fn(); err != nil {
		fail(fmt.Errorf("%s: %w", name, err))
	}
	fmt.Printf("%s %.3f\n", name, time.Since(start).Seconds())
}

// seqWrite writes like dd and cp do: opened write-only.
func seqWrite(p string, mib int) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for i := 0; i < mib; i++ {
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func seqRead(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		_, err := f.Read(buf)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func randRead(p string, mib int) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4096)
	blocks := int64(mib) << 8
	for i := 0; i < 20000; i++ {
		if _, err := f.ReadAt(buf, r.Int64N(blocks)*4096); err != nil {
			return err
		}
	}
	return nil
}

// makeTree builds the tar archive of the tree in memory.
func makeTree(n int) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	body := bytes.Repeat([]byte("kiwi-shim fsbench "), 114)[:2048]
	for d := 0; d < 100; d++ {
		tw.WriteHeader(&tar.Header{Name: "d" + strconv.Itoa(d) + "/", Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for i := 0; i < n; i++ {
		tw.WriteHeader(&tar.Header{Name: "d" + strconv.Itoa(i%100) + "/f" + strconv.Itoa(i), Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(1e9, 0)})
		tw.Write(body)
	}
	tw.Close()
	return b.Bytes()
}

// untar unpacks like tar -x: create, write, close, chmod, utimes.
func untar(archive []byte, root string) error {
	tr := tar.NewReader(bytes.NewReader(archive))
	if err := os.Mkdir(root, 0o755); err != nil {
		return err
	}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(root, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, tr); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			if err := os.Chtimes(p, h.ModTime, h.ModTime); err != nil {
				return err
			}
		}
	}
}

func findStat(root string) error {
	n := 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if _, err := os.Lstat(p); err != nil {
			return err
		}
		n++
		return nil
	})
	if err == nil && n == 0 {
		err = fmt.Errorf("empty tree")
	}
	return err
}
