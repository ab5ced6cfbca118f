package initramfs

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// maxModuleSize bounds a decompressed module (the largest of Debian's,
// amdgpu, is about 20 MiB): a corrupt file in the kernel cache must not
// fill the host's memory.
const maxModuleSize = 256 << 20

// readModule returns a module file's ELF image, decompressed on the
// host when the kernel ships it compressed (.ko.xz, .ko.zst, .ko.gz).
// The initramfs carries modules uncompressed: decompressing on the
// host, once per cached initramfs, is cheaper than having an emulated
// guest do it at every boot, and the guest's loader needs no
// MODULE_INIT_COMPRESSED_FILE support.
func readModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read module: %w", err)
	}
	defer f.Close()
	var r io.Reader
	switch {
	case strings.HasSuffix(path, ".ko"):
		r = f
	case strings.HasSuffix(path, ".ko.xz"):
		r, err = xz.NewReader(f)
	case strings.HasSuffix(path, ".ko.zst"):
		var d *zstd.Decoder
		d, err = zstd.NewReader(f)
		if err == nil {
			defer d.Close()
			r = d
		}
	case strings.HasSuffix(path, ".ko.gz"):
		var g *gzip.Reader
		g, err = gzip.NewReader(f)
		if err == nil {
			defer g.Close()
			r = g
		}
	default:
		return nil, fmt.Errorf("read module %s: not a module file", path)
	}
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(r, maxModuleSize+1))
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	if n > maxModuleSize {
		return nil, fmt.Errorf("read module %s: over %d MiB decompressed", path, maxModuleSize>>20)
	}
	return buf.Bytes(), nil
}
