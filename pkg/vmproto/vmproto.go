// Package vmproto is the wire protocol between kiwi-shim on the host and
// kiwi-box-init in the guest, and between kiwi-shim commands and a VM's
// monitor process. It is a stream of frames: a 12-byte little-endian header
// (type, reserved, stream id, payload length) and a bounded payload. Control
// messages carry JSON; stdio frames carry raw bytes.
//
// The guest is untrusted: a reader never allocates more than MaxPayload for
// a frame, and every decoder rejects what it does not understand.
//
// It depends on the standard library only, so that the guest init stays a
// small static binary.
package vmproto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Version is the protocol version both sides announce in Hello.
const Version = 1

// MaxPayload bounds one frame's payload.
const MaxPayload = 1 << 20

// HeaderSize is the size of a frame header.
const HeaderSize = 12

// Type says what a frame carries.
type Type uint8

// Frame types. Comments say who sends them: H host (monitor), G guest, C a
// kiwi-shim command talking to the monitor.
const (
	THello    Type = 1  // G->H: Hello
	TConfig   Type = 2  // H->G: Config
	TReady    Type = 3  // G->H: setup done, container root in place
	TStart    Type = 4  // H->G, C->H: start the container process (stream 0)
	TExec     Type = 5  // H->G, C->H: Process for a new stream id
	TStarted  Type = 6  // G->H, H->C: Started
	TStdin    Type = 7  // H->G, C->H: bytes for a stream's stdin; empty = EOF
	TStdout   Type = 8  // G->H, H->C: bytes from a stream's stdout; empty = EOF
	TStderr   Type = 9  // G->H, H->C: bytes from a stream's stderr; empty = EOF
	TSignal   Type = 10 // H->G, C->H: Signal
	TResize   Type = 11 // H->G, C->H: Resize
	TExit     Type = 12 // G->H, H->C: Exit
	TError    Type = 13 // any: Error
	TState    Type = 14 // C->H: ask; H->C: State
	TPoweroff Type = 15 // H->G: stop everything and power off
	TPause    Type = 16 // C->H: stop the VM's vCPUs; H->C: done
	TResume   Type = 17 // C->H: continue them; H->C: done
	TQuiesce  Type = 18 // H->G before a template is saved: finish the background work; G->H: done, now idle
	maxType   Type = 18
)

// Frame is one message.
type Frame struct {
	Type    Type
	Stream  uint32
	Payload []byte
}

// ErrTooLarge is returned for a frame whose payload exceeds MaxPayload.
var ErrTooLarge = errors.New("vmproto: frame payload too large")

// ReadFrame reads one frame. It never allocates more than MaxPayload.
func ReadFrame(r io.Reader) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	f := Frame{Type: Type(h[0]), Stream: binary.LittleEndian.Uint32(h[4:8])}
	if f.Type == 0 || f.Type > maxType {
		return Frame{}, fmt.Errorf("vmproto: unknown frame type %d", h[0])
	}
	if h[1] != 0 || h[2] != 0 || h[3] != 0 {
		return Frame{}, errors.New("vmproto: reserved header bytes set")
	}
	n := binary.LittleEndian.Uint32(h[8:12])
	if n > MaxPayload {
		return Frame{}, ErrTooLarge
	}
	if n > 0 {
		f.Payload = make([]byte, n)
		if _, err := io.ReadFull(r, f.Payload); err != nil {
			return Frame{}, fmt.Errorf("vmproto: short frame: %w", err)
		}
	}
	return f, nil
}

// Writer writes frames; it is safe for concurrent use.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write sends one frame, splitting nothing: payloads above MaxPayload are
// an error (stdio writers chunk their data themselves).
func (w *Writer) Write(t Type, stream uint32, payload []byte) error {
	if len(payload) > MaxPayload {
		return ErrTooLarge
	}
	buf := make([]byte, HeaderSize+len(payload))
	buf[0] = byte(t)
	binary.LittleEndian.PutUint32(buf[4:8], stream)
	binary.LittleEndian.PutUint32(buf[8:12], uint32(len(payload)))
	copy(buf[HeaderSize:], payload)
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err := w.w.Write(buf)
	return err
}

// WriteJSON sends a control message.
func (w *Writer) WriteJSON(t Type, stream uint32, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return w.Write(t, stream, b)
}

// Pump copies r to the peer as frames of type t on stream, in chunks of at
// most 32 KiB, and ends with an empty frame (EOF) once r ends for any
// reason (a pty master reports the slave's close as EIO). It returns early,
// without the EOF frame, if the peer cannot be written to.
func (w *Writer) Pump(t Type, stream uint32, r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 && w.Write(t, stream, buf[:n]) != nil {
			return
		}
		if err != nil {
			w.Write(t, stream, nil)
			return
		}
	}
}

// Decode parses a control message payload strictly.
func Decode(payload []byte, v any) error {
	if len(payload) == 0 {
		return errors.New("vmproto: empty control message")
	}
	if err := json.Unmarshal(payload, v); err != nil {
		return fmt.Errorf("vmproto: bad control message: %w", err)
	}
	return nil
}

// The guest's initramfs lists the kernel modules it loads in two files
// (absolute paths in the guest, one per line, dependencies first), which
// pkg/initramfs writes and kiwi-box-init reads.
const (
	// ModuleLoadList lists the modules the guest loads before the
	// container's process starts.
	ModuleLoadList = "/lib/modules/kiwi-box.load"
	// ModuleLaterList lists the modules it loads afterwards, in the
	// background.
	ModuleLaterList = "/lib/modules/kiwi-box.later"
)

// Hello is the guest's first message.
type Hello struct {
	Version int    `json:"version"`
	Kernel  string `json:"kernel"`
	// Boot has the guest's clock readings up to Hello (Init, Modules,
	// Hello).
	Boot BootTimes `json:"boot"`
}

// Ready is the guest's report that the container's root is set up (the
// payload of TReady; a guest may send none).
type Ready struct {
	// Boot has the guest's clock readings (Config, Mounts, Ready).
	Boot BootTimes `json:"boot"`
}

// BootTimes are readings of the guest's CLOCK_BOOTTIME, in nanoseconds
// since its kernel started, at the steps of a box's start: the host
// combines them with its own clock to say where the boot time went. Zero
// is "not measured".
type BootTimes struct {
	Init    int64 `json:"init,omitempty"`    // kiwi-box-init runs: the kernel's part is over
	Modules int64 `json:"modules,omitempty"` // the modules the box needs are loaded
	Hello   int64 `json:"hello,omitempty"`   // the control port is open, Hello goes out
	Config  int64 `json:"config,omitempty"`  // the configuration has arrived
	Mounts  int64 `json:"mounts,omitempty"`  // the container's root and mounts are in place
	Ready   int64 `json:"ready,omitempty"`   // network, DNS, rlimits and the program's check done
}

// Config tells the guest how to build the container.
type Config struct {
	// Hostname of the container.
	Hostname string `json:"hostname,omitempty"`
	// RootTag is the share that holds the root filesystem.
	RootTag string `json:"rootTag"`
	// RootShare is "9p" or "virtiofs".
	RootShare string `json:"rootShare"`
	// RootReadonly mounts the root read-only.
	RootReadonly bool `json:"rootReadonly,omitempty"`
	// RootPropagation is the root mount's propagation (shared, rslave,
	// ...), as the OCI spec's linux.rootfsPropagation; "" leaves it.
	RootPropagation string `json:"rootPropagation,omitempty"`
	// Mounts are set up in order inside the new root.
	Mounts []Mount `json:"mounts,omitempty"`
	// Process is the container's process (stream 0).
	Process Process `json:"process"`
	// Rlimits apply to every process of the container.
	Rlimits []Rlimit `json:"rlimits,omitempty"`
	// Network configures the guest's interfaces; nil leaves only lo.
	Network *Network `json:"network,omitempty"`
	// DirectDNS leaves the container's resolv.conf as it came; otherwise
	// the guest's DNS forwarder answers for its nameservers.
	DirectDNS bool `json:"directDNS,omitempty"`
	// Sysctl are kernel parameters (net.ipv4.ip_forward) set in the
	// guest before the process starts.
	Sysctl map[string]string `json:"sysctl,omitempty"`
	// ReadonlyPaths are made read-only and MaskedPaths hidden in the
	// container's root, as the OCI spec's linux.readonlyPaths and
	// linux.maskedPaths.
	ReadonlyPaths []string `json:"readonlyPaths,omitempty"`
	MaskedPaths   []string `json:"maskedPaths,omitempty"`
	// Devices are nodes made in the container's /dev (linux.devices).
	// Their numbers name the guest kernel's devices.
	Devices []Device `json:"devices,omitempty"`
	// UserNS, when set, puts every process of the container (the first
	// and the exec'd ones) in a user namespace with these mappings.
	UserNS *UserNS `json:"userNS,omitempty"`
	// Time is the host's CLOCK_REALTIME (ns since the epoch) when it sent
	// the configuration: the guest sets its clock to it, which matters
	// most for a guest restored from a template (its clock is the
	// template's). 0 leaves the clock.
	Time int64 `json:"time,omitempty"`
	// Seed is random bytes from the host that the guest credits to its
	// entropy pool and reseeds its random generator with, so that no two
	// boxes restored from one template share random state.
	Seed []byte `json:"seed,omitempty"`
	// Hotplugged says the box's devices (shares, NICs, disks) were
	// hot-plugged into a guest restored from a template: the guest waits
	// for them to appear (bounded) before it uses them.
	Hotplugged bool `json:"hotplugged,omitempty"`
	// PidNS puts the container's first process in a PID namespace of its
	// own, as its PID 1 (without a user namespace also in a mount
	// namespace, where /proc is that namespace's); exec'd processes join
	// them.
	PidNS bool `json:"pidNS,omitempty"`
}

// Device is a device node or fifo, as the OCI spec's linux.devices.
type Device struct {
	Path  string `json:"path"`
	Type  string `json:"type"` // "c", "u", "b" or "p"
	Major int64  `json:"major,omitempty"`
	Minor int64  `json:"minor,omitempty"`
	// Mode holds the permission bits; nil means 0666.
	Mode *uint32 `json:"mode,omitempty"`
	UID  *uint32 `json:"uid,omitempty"`
	GID  *uint32 `json:"gid,omitempty"`
}

// UserNS are the mappings of a user namespace.
type UserNS struct {
	UIDMappings []IDMap `json:"uidMappings"`
	GIDMappings []IDMap `json:"gidMappings"`
}

// IDMap maps Size ids from ContainerID inside the namespace to HostID in
// the guest's initial namespace.
type IDMap struct {
	ContainerID uint32 `json:"containerID"`
	HostID      uint32 `json:"hostID"`
	Size        uint32 `json:"size"`
}

// Network is the guest's network configuration.
type Network struct {
	// Interfaces are matched to the guest's NICs by MAC address.
	Interfaces []Interface `json:"interfaces,omitempty"`
	// Routes are added after the addresses.
	Routes []Route `json:"routes,omitempty"`
}

// Interface is one NIC's configuration.
type Interface struct {
	MAC string `json:"mac"`
	// Addresses in CIDR notation.
	Addresses []string `json:"addresses,omitempty"`
	MTU       int      `json:"mtu,omitempty"`
}

// Route is one route; an empty Destination is the default route.
type Route struct {
	Destination string `json:"destination,omitempty"`
	Gateway     string `json:"gateway"`
}

// Mount is one mount inside the container.
type Mount struct {
	// Destination inside the container.
	Destination string `json:"destination"`
	// Type is a filesystem type (proc, tmpfs, ...), "share" for a host
	// directory served under Tag, "file" for a host file whose content
	// travels in Content, or "disk" for the ext4 file system on the
	// virtio-blk disk whose serial is Source.
	Type string `json:"type"`
	// Source for filesystem mounts.
	Source string `json:"source,omitempty"`
	// Tag of the share.
	Tag string `json:"tag,omitempty"`
	// Options as in the OCI spec (ro, nosuid, mode=755, ...).
	Options []string `json:"options,omitempty"`
	// Content of a "file" mount.
	Content []byte `json:"content,omitempty"`
}

// Process is a process to run.
type Process struct {
	Args           []string `json:"args"`
	Env            []string `json:"env,omitempty"`
	Cwd            string   `json:"cwd"`
	UID            uint32   `json:"uid"`
	GID            uint32   `json:"gid"`
	AdditionalGids []uint32 `json:"additionalGids,omitempty"`
	Umask          *uint32  `json:"umask,omitempty"`
	Terminal       bool     `json:"terminal,omitempty"`
	Rows           uint16   `json:"rows,omitempty"`
	Cols           uint16   `json:"cols,omitempty"`
	// Capabilities limit the process's capabilities; nil leaves it all
	// of root's (the guest's kernel is the box's boundary either way).
	Capabilities    *Capabilities `json:"capabilities,omitempty"`
	NoNewPrivileges bool          `json:"noNewPrivileges,omitempty"`
	// OOMScoreAdj is written to the process's oom_score_adj.
	OOMScoreAdj *int `json:"oomScoreAdj,omitempty"`
}

// Capabilities are a process's capability sets, by OCI name (CAP_CHOWN).
type Capabilities struct {
	Bounding    []string `json:"bounding,omitempty"`
	Effective   []string `json:"effective,omitempty"`
	Inheritable []string `json:"inheritable,omitempty"`
	Permitted   []string `json:"permitted,omitempty"`
	Ambient     []string `json:"ambient,omitempty"`
}

// Rlimit is one resource limit.
type Rlimit struct {
	Type string `json:"type"`
	Hard uint64 `json:"hard"`
	Soft uint64 `json:"soft"`
}

// Started reports a started process.
type Started struct {
	Pid int `json:"pid"`
}

// Exit reports a process's end as a shell status (128+N for signal N).
type Exit struct {
	Status int `json:"status"`
}

// Signal asks for a signal to be delivered.
type Signal struct {
	Signal int  `json:"signal"`
	All    bool `json:"all,omitempty"`
}

// Resize changes a terminal's size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Error reports a failure.
type Error struct {
	Message string `json:"message"`
}

// State is the monitor's answer to TState.
type State struct {
	Status string `json:"status"`
	Pid    int    `json:"pid"`
}
