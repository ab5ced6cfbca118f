// Package state keeps kiwi-shim's record of each container under the
// runtime root: one directory per container holding container.json.
// The record is what every later command (start, state, kill, delete)
// needs to find the container again, whatever mode it runs in.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// ErrNotExist is returned for a container that has no record.
var ErrNotExist = errors.New("container does not exist")

// Container is the record of one container.
type Container struct {
	// ID is the container id.
	ID string `json:"id"`
	// Bundle is the bundle directory the caller created the container from.
	Bundle string `json:"bundle"`
	// Mode is the mode the container runs in.
	Mode config.Mode `json:"mode"`
	// Created is when create ran.
	Created time.Time `json:"created"`
	// Annotations are the spec's annotations, for `state`.
	Annotations map[string]string `json:"annotations,omitempty"`
	// RuntimeBundle is the rewritten bundle handed to the low-level
	// runtime (container mode).
	RuntimeBundle string `json:"runtimeBundle,omitempty"`
	// Pid is the container's init process on the host.
	Pid int `json:"pid,omitempty"`
	// KeeperPID is the process holding the container's loop lease.
	KeeperPID int `json:"keeperPid,omitempty"`
	// Devices are the loop devices leased for the container.
	Devices []string `json:"devices,omitempty"`
	// Scratch is the image of the VM's scratch disk, removed on delete.
	Scratch string `json:"scratch,omitempty"`
	// Cgroup is the cgroup made for a VM's host processes (see
	// hostcgroup), removed on delete.
	Cgroup string `json:"cgroup,omitempty"`
	// Hooks are the spec's hooks that kiwi-shim runs itself after
	// create (VM mode: poststart at start, poststop at delete).
	Hooks *specs.Hooks `json:"hooks,omitempty"`
}

// OCI is a container's state as `kiwi-shim state` prints it: the OCI
// runtime-spec state plus the fields runc adds (created, owner).
type OCI struct {
	OCIVersion  string            `json:"ociVersion"`
	ID          string            `json:"id"`
	Status      string            `json:"status"`
	Pid         int               `json:"pid"`
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs,omitempty"`
	Created     string            `json:"created,omitempty"`
	Owner       string            `json:"owner,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// WritePidFile writes a pid file atomically, as runc does: conmon and
// containerd read it as soon as it appears.
func WritePidFile(p string, pid int) error {
	tmp := filepath.Join(filepath.Dir(p), "."+filepath.Base(p)+".tmp")
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return fmt.Errorf("write pid file: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("write pid file: %w", err)
	}
	return nil
}

// Store is the set of container records under a root directory.
type Store struct {
	root string
}

// NewStore returns the store under root (the runtime's --root).
func NewStore(root string) Store { return Store{root: root} }

// Root is the runtime root directory.
func (s Store) Root() string { return s.root }

func (s Store) containers() string { return filepath.Join(s.root, "containers") }

// Dir is the state directory of container id.
func (s Store) Dir(id string) string { return filepath.Join(s.containers(), id) }

func (s Store) file(id string) string { return filepath.Join(s.Dir(id), "container.json") }

// Create makes the state directory of a new container. It fails if a
// container with that id exists.
func (s Store) Create(c *Container) error {
	if err := oci.ValidateID(c.ID); err != nil {
		return err
	}
	if err := os.MkdirAll(s.containers(), 0o711); err != nil {
		return fmt.Errorf("state root: %w", err)
	}
	if err := os.Mkdir(s.Dir(c.ID), 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("container %s already exists", c.ID)
		}
		return fmt.Errorf("state of %s: %w", c.ID, err)
	}
	return s.Save(c)
}

// Save writes the record atomically.
func (s Store) Save(c *Container) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.file(c.ID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("save state of %s: %w", c.ID, err)
	}
	if err := os.Rename(tmp, s.file(c.ID)); err != nil {
		return fmt.Errorf("save state of %s: %w", c.ID, err)
	}
	return nil
}

// Load reads the record of container id.
func (s Store) Load(id string) (*Container, error) {
	if err := oci.ValidateID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.file(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("container %s: %w", id, ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("state of %s: %w", id, err)
	}
	var c Container
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("state of %s is corrupt (remove %s): %w", id, s.Dir(id), err)
	}
	return &c, nil
}

// Remove deletes the state directory of container id.
func (s Store) Remove(id string) error {
	if err := oci.ValidateID(id); err != nil {
		return err
	}
	if err := os.RemoveAll(s.Dir(id)); err != nil {
		return fmt.Errorf("remove state of %s: %w", id, err)
	}
	return nil
}

// List returns the ids of all containers with a record, sorted.
func (s Store) List() ([]string, error) {
	ents, err := os.ReadDir(s.containers())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && oci.ValidateID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	sort.Strings(ids)
	return ids, nil
}
