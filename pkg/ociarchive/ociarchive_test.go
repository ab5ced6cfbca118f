package ociarchive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

type file struct {
	name, body, link string
	typ              byte
}

func layer(t *testing.T, gz bool, files ...file) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Typeflag: f.typ, Mode: 0o644, Linkname: f.link, Size: int64(len(f.body))}
		if f.typ == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeDir {
			h.Mode, h.Size = 0o755, 0
		}
		if h.Typeflag == tar.TypeSymlink {
			h.Size = 0
		}
		tw.WriteHeader(h)
		if h.Size > 0 {
			tw.Write([]byte(f.body))
		}
	}
	tw.Close()
	if !gz {
		return buf.Bytes()
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(buf.Bytes())
	zw.Close()
	return z.Bytes()
}

// writeArchive writes an OCI archive with the given layers; corrupt
// changes one byte of the last layer after its digest was taken.
func writeArchive(t *testing.T, corrupt bool, layers ...[]byte) string {
	t.Helper()
	blobs := map[digest.Digest][]byte{}
	add := func(b []byte) ocispec.Descriptor {
		d := digest.FromBytes(b)
		blobs[d] = b
		return ocispec.Descriptor{Digest: d, Size: int64(len(b))}
	}
	cfg, _ := json.Marshal(ocispec.Image{Config: ocispec.ImageConfig{Env: []string{"PATH=/usr/bin"}, Cmd: []string{"/bin/sh"}}})
	m := ocispec.Manifest{Config: add(cfg), MediaType: ocispec.MediaTypeImageManifest}
	m.Config.MediaType = ocispec.MediaTypeImageConfig
	for i, l := range layers {
		d := add(l)
		d.MediaType = ocispec.MediaTypeImageLayerGzip
		m.Layers = append(m.Layers, d)
		if corrupt && i == len(layers)-1 {
			c := append([]byte(nil), l...)
			c[len(c)/2] ^= 0xff
			blobs[d.Digest] = c
		}
	}
	mb, _ := json.Marshal(m)
	md := add(mb)
	md.MediaType = ocispec.MediaTypeImageManifest
	ib, _ := json.Marshal(ocispec.Index{Manifests: []ocispec.Descriptor{md}})

	p := filepath.Join(t.TempDir(), "image.oci.tar")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	put := func(name string, b []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(b))})
		tw.Write(b)
	}
	put("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	for d, b := range blobs {
		put("blobs/sha256/"+d.Encoded(), b)
	}
	put("index.json", ib)
	tw.Close()
	f.Close()
	return p
}

func TestUnpack(t *testing.T) {
	base := layer(t, true,
		file{name: "etc/", typ: tar.TypeDir},
		file{name: "etc/os-release", body: "ID=debian\n"},
		file{name: "etc/gone", body: "x"},
		file{name: "bin/", typ: tar.TypeDir},
		file{name: "bin/sh", body: "#!"},
	)
	top := layer(t, false,
		file{name: "etc/.wh.gone"},
		file{name: "etc/new", body: "layer 2\n"},
		file{name: "escape", typ: tar.TypeSymlink, link: "../../../../outside"},
	)
	p := writeArchive(t, false, base, top)
	a, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	root := filepath.Join(t.TempDir(), "rootfs")
	img, err := a.Unpack(context.Background(), root, UnpackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Config.Cmd) != 1 || img.Config.Env[0] != "PATH=/usr/bin" {
		t.Fatalf("config %+v", img.Config)
	}
	for name, want := range map[string]string{"etc/os-release": "ID=debian\n", "etc/new": "layer 2\n", "bin/sh": "#!"} {
		if b, err := os.ReadFile(filepath.Join(root, name)); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", name, b, err, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(root, "etc/gone")); !os.IsNotExist(err) {
		t.Errorf("whiteout not applied: %v", err)
	}
	if l, err := os.Readlink(filepath.Join(root, "escape")); err != nil || l != "../../../../outside" {
		t.Errorf("symlink %q, %v", l, err)
	}
}

func TestUnpackErrors(t *testing.T) {
	// Uncompressed, so that the flipped byte lands in a file's body and
	// only the digest can tell.
	good := layer(t, false, file{name: "a", body: strings.Repeat("a", 4096)})
	for _, tc := range []struct {
		name, want string
		path       func() string
	}{
		{"corrupt layer", "does not match its digest", func() string { return writeArchive(t, true, good) }},
		{"not an archive", "index.json", func() string {
			p := filepath.Join(t.TempDir(), "x.tar")
			var buf bytes.Buffer
			tw := tar.NewWriter(&buf)
			tw.Close()
			os.WriteFile(p, buf.Bytes(), 0o644)
			return p
		}},
		{"escaping entry", "", func() string {
			return writeArchive(t, false, layer(t, false, file{name: "../../../../tmp/kiwi-ociarchive-escape", body: "x"}))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := Open(tc.path())
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			root := t.TempDir()
			_, err = a.Unpack(context.Background(), root, UnpackOptions{})
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if _, err := os.Stat("/tmp/kiwi-ociarchive-escape"); err == nil {
				os.Remove("/tmp/kiwi-ociarchive-escape")
				t.Fatal("a layer entry escaped the root")
			}
		})
	}
}
