// Package ociarchive unpacks an OCI image archive, the tar file that
// `podman save --format oci-archive` and `skopeo copy oci-archive:` write,
// into a root file system, without a container engine.
//
// Layers are applied with containerd's archive package, which handles
// whiteouts and keeps every entry below the root; each blob's digest is
// checked while it streams.
package ociarchive

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
)

// maxMetadata bounds index, manifest and config blobs.
const maxMetadata = 4 << 20

// Archive is an open OCI image archive.
type Archive struct {
	f     *os.File
	path  string
	blobs map[string]entry // by path inside the archive
}

type entry struct{ off, size int64 }

// Open indexes the archive's entries.
func Open(path string) (*Archive, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	a := &Archive{f: f, path: path, blobs: map[string]entry{}}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		// tar.Reader has read exactly the header: the file's position is
		// where the entry's data starts.
		off, err := f.Seek(0, io.SeekCurrent)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		a.blobs[cleanName(h.Name)] = entry{off: off, size: h.Size}
	}
	return a, nil
}

// Close releases the archive.
func (a *Archive) Close() error { return a.f.Close() }

func cleanName(n string) string {
	for len(n) > 2 && n[:2] == "./" {
		n = n[2:]
	}
	return n
}

// blob returns a reader of the blob with digest d that fails at EOF when
// the content does not match the digest.
func (a *Archive) blob(d digest.Digest) (io.Reader, int64, error) {
	if err := d.Validate(); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", a.path, err)
	}
	e, ok := a.blobs["blobs/"+d.Algorithm().String()+"/"+d.Encoded()]
	if !ok {
		return nil, 0, fmt.Errorf("%s: blob %s missing", a.path, d)
	}
	return &verifier{r: io.NewSectionReader(a.f, e.off, e.size), v: d.Verifier(), d: d}, e.size, nil
}

type verifier struct {
	r io.Reader
	v digest.Verifier
	d digest.Digest
}

func (v *verifier) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.v.Write(p[:n])
	if err == io.EOF && !v.v.Verified() {
		return n, fmt.Errorf("blob %s: content does not match its digest", v.d)
	}
	return n, err
}

func (a *Archive) readJSON(d digest.Digest, v any) error {
	r, size, err := a.blob(d)
	if err != nil {
		return err
	}
	if size > maxMetadata {
		return fmt.Errorf("%s: blob %s is %d bytes, more than a manifest or config may be", a.path, d, size)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: blob %s: %w", a.path, d, err)
	}
	return nil
}

// Manifest returns the image's manifest: the only one in index.json, or
// the one for this machine's architecture when there are several.
func (a *Archive) Manifest() (ocispec.Manifest, error) {
	var m ocispec.Manifest
	e, ok := a.blobs["index.json"]
	if !ok {
		return m, fmt.Errorf("%s: no index.json: not an OCI image archive", a.path)
	}
	if e.size > maxMetadata {
		return m, fmt.Errorf("%s: index.json too large", a.path)
	}
	b, err := io.ReadAll(io.NewSectionReader(a.f, e.off, e.size))
	if err != nil {
		return m, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return m, fmt.Errorf("%s: index.json: %w", a.path, err)
	}
	// One level of nesting (an image index inside index.json) is what
	// multi-architecture saves produce.
	for depth := 0; depth < 2; depth++ {
		desc, err := pick(idx.Manifests)
		if err != nil {
			return m, fmt.Errorf("%s: %w", a.path, err)
		}
		switch desc.MediaType {
		case ocispec.MediaTypeImageManifest, "application/vnd.docker.distribution.manifest.v2+json":
			err := a.readJSON(desc.Digest, &m)
			return m, err
		case ocispec.MediaTypeImageIndex, "application/vnd.docker.distribution.manifest.list.v2+json":
			idx = ocispec.Index{}
			if err := a.readJSON(desc.Digest, &idx); err != nil {
				return m, err
			}
		default:
			return m, fmt.Errorf("%s: unsupported manifest media type %q", a.path, desc.MediaType)
		}
	}
	return m, fmt.Errorf("%s: image indexes nested too deeply", a.path)
}

func pick(ds []ocispec.Descriptor) (ocispec.Descriptor, error) {
	if len(ds) == 1 {
		return ds[0], nil
	}
	for _, d := range ds {
		if d.Platform != nil && d.Platform.OS == "linux" && d.Platform.Architecture == runtime.GOARCH {
			return d, nil
		}
	}
	if len(ds) == 0 {
		return ocispec.Descriptor{}, errors.New("the archive holds no image")
	}
	return ocispec.Descriptor{}, fmt.Errorf("%d images and none for linux/%s", len(ds), runtime.GOARCH)
}

// UnpackOptions adjust Unpack.
type UnpackOptions struct {
	// NoSameOwner leaves every file to the unpacking user, like tar's
	// --no-same-owner: for a user namespace that maps only that user.
	NoSameOwner bool
}

// Unpack applies the image's layers to the directory root (created if
// missing) and returns the image's configuration. On error root holds a
// partial tree, which the caller removes.
func (a *Archive) Unpack(ctx context.Context, root string, o UnpackOptions) (ocispec.Image, error) {
	var img ocispec.Image
	m, err := a.Manifest()
	if err != nil {
		return img, err
	}
	if err := a.readJSON(m.Config.Digest, &img); err != nil {
		return img, err
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return img, err
	}
	// containerd's archive code warns on stderr about every device node it
	// skips in a user namespace; errors are returned anyway.
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	ctx = log.WithLogger(ctx, logrus.NewEntry(quiet))
	for i, l := range m.Layers {
		if err := ctx.Err(); err != nil {
			return img, err
		}
		r, _, err := a.blob(l.Digest)
		if err != nil {
			return img, err
		}
		ds, err := compression.DecompressStream(r)
		if err != nil {
			return img, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
		var opts []archive.ApplyOpt
		if o.NoSameOwner {
			opts = append(opts, archive.WithNoSameOwner())
		}
		_, err = archive.Apply(ctx, root, ds, opts...)
		ds.Close()
		if err == nil {
			// Drain the rest (tar padding) so that the digest is checked.
			_, err = io.Copy(io.Discard, r)
		}
		if err != nil {
			return img, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
	}
	return img, nil
}
