package oci

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// maxConfigSize bounds config.json; real ones are a few KiB.
const maxConfigSize = 8 << 20

var idPattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_+.-]*$`)

// ValidateID checks a container id the way runc does. Ids become path
// components of the state directory, so this is also what keeps "..",
// slashes and NUL out of host paths.
func ValidateID(id string) error {
	if id == "" {
		return errors.New("container id is empty")
	}
	if len(id) > 1024 || !idPattern.MatchString(id) || id == "." || id == ".." {
		return fmt.Errorf("invalid container id %.64q: use letters, digits, '_', '+', '-' and '.'", id)
	}
	return nil
}

// LoadSpec reads and checks bundle/config.json.
func LoadSpec(bundle string) (*specs.Spec, error) {
	p := filepath.Join(bundle, "config.json")
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("bundle %s has no config.json (create one with 'kiwi-shim spec')", bundle)
		}
		return nil, fmt.Errorf("read bundle: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("%s is larger than %d MiB", p, maxConfigSize>>20)
	}
	s, err := ParseSpec(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	root := s.Root.Path
	if !filepath.IsAbs(root) {
		root = filepath.Join(bundle, root)
	}
	if fi, err := os.Stat(root); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%s: root.path %q is not a directory in the bundle", p, s.Root.Path)
	}
	return s, nil
}

// ParseSpec decodes and checks a config.json document.
func ParseSpec(b []byte) (*specs.Spec, error) {
	var s specs.Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if dec.More() {
		return nil, errors.New("invalid JSON: trailing data after the document")
	}
	if err := checkVersion(s.Version); err != nil {
		return nil, err
	}
	if s.Root == nil || s.Root.Path == "" {
		return nil, errors.New("root.path is missing")
	}
	if s.Process == nil {
		return nil, errors.New("process is missing")
	}
	if len(s.Process.Args) == 0 {
		return nil, errors.New("process.args is empty")
	}
	if s.Process.Cwd == "" || !filepath.IsAbs(s.Process.Cwd) {
		return nil, fmt.Errorf("process.cwd %q: want an absolute path", s.Process.Cwd)
	}
	if s.Linux == nil {
		return nil, errors.New("linux section is missing (kiwi-shim runs Linux containers only)")
	}
	if _, err := ParseAnnotations(s.Annotations); err != nil {
		return nil, err
	}
	return &s, nil
}

// checkVersion accepts the 1.x specs that runc accepts.
func checkVersion(v string) error {
	if v == "" {
		return errors.New("ociVersion is missing")
	}
	major, _, _ := strings.Cut(v, ".")
	if major != "1" {
		return fmt.Errorf("ociVersion %q is not supported: kiwi-shim implements runtime-spec 1.x", v)
	}
	return nil
}

// RootPath returns the absolute rootfs path of spec in bundle.
func RootPath(bundle string, s *specs.Spec) string {
	if filepath.IsAbs(s.Root.Path) {
		return s.Root.Path
	}
	return filepath.Join(bundle, s.Root.Path)
}
