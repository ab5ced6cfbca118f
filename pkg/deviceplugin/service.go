package deviceplugin

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// slotPrefix begins the device ids the plugin advertises: kiwi-loop-0,
// kiwi-loop-1, ... They are slots of the capacity, not loop device
// names: which devices a lease gets is the allocator's choice, made when
// the kubelet allocates.
const slotPrefix = "kiwi-loop-"

// service is the plugin's gRPC DevicePlugin service.
type service struct {
	pluginapi.UnimplementedDevicePluginServer
	p *Plugin
}

// GetDevicePluginOptions says that the plugin needs neither
// PreStartContainer nor GetPreferredAllocation.
func (s *service) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

// ListAndWatch sends the slots once; they do not change while the
// plugin runs. The stream ends when the kubelet closes it or the server
// stops.
func (s *service) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	devs := make([]*pluginapi.Device, s.p.opts.Devices)
	for i := range devs {
		devs[i] = &pluginapi.Device{ID: slotPrefix + strconv.Itoa(i), Health: pluginapi.Healthy}
	}
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
		return fmt.Errorf("send device list: %w", err)
	}
	<-stream.Context().Done()
	return nil
}

// validSlot reports whether id is one of the advertised slots.
func (s *service) validSlot(id string) bool {
	n, ok := strings.CutPrefix(id, slotPrefix)
	i, err := strconv.Atoi(n)
	return ok && err == nil && i >= 0 && i < s.p.opts.Devices && strconv.Itoa(i) == n
}

// Allocate leases as many devices as each container asks for slots and
// answers with the lease annotation. If any container's lease fails, the
// leases made for the others are released and the call fails.
func (s *service) Allocate(ctx context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	var made []*allocation
	for _, creq := range req.GetContainerRequests() {
		a, err := s.allocate(ctx, creq.GetDevicesIds())
		if err != nil {
			for _, m := range made {
				if s.p.ledger.take(m.id) != nil {
					s.p.release(m, "a sibling allocation failed")
				}
			}
			s.p.log.Error("allocate", "err", err)
			return nil, err
		}
		made = append(made, a)
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Annotations: map[string]string{oci.AnnotationLoopLease: oci.LoopLease{ID: a.id, Devices: a.devices}.String()},
		})
	}
	return resp, nil
}

// allocate leases devices for one container's slots and records them.
func (s *service) allocate(ctx context.Context, slots []string) (*allocation, error) {
	if len(slots) == 0 {
		return nil, fmt.Errorf("allocate: no %s devices asked for", ResourceName)
	}
	seen := map[string]bool{}
	for _, id := range slots {
		if !s.validSlot(id) || seen[id] {
			return nil, fmt.Errorf("allocate: device id %.40q is not one of this plugin's (or named twice)", id)
		}
		seen[id] = true
	}
	for _, old := range s.p.ledger.takeSlots(slots) {
		s.p.release(old, "the kubelet gave its slots to a new allocation")
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	actx, cancel := context.WithTimeout(ctx, s.p.opts.AllocateTimeout)
	defer cancel()
	lease, err := s.p.opts.Alloc.Acquire(actx, loopdev.Request{Owner: "kubernetes allocation " + id, Count: len(slots), Wait: true})
	if err != nil {
		return nil, fmt.Errorf("allocate %d loop device(s): %w", len(slots), err)
	}
	a := &allocation{id: id, lease: lease, slots: append([]string(nil), slots...), since: s.p.now()}
	for _, d := range lease.Devices() {
		a.devices = append(a.devices, d.Name())
	}
	s.p.ledger.add(a)
	s.p.log.Info("allocated", "id", id, "slots", slots, "devices", a.devices)
	return a, nil
}

// PreStartContainer is not used (GetDevicePluginOptions says so).
func (s *service) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

// newID is a random allocation id: 128 bits, so that one cannot be
// guessed from another.
func newID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("allocation id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// release gives back the lease of an allocation taken out of the ledger.
func (p *Plugin) release(a *allocation, why string) {
	if err := a.lease.Release(); err != nil {
		p.log.Warn("release unadopted loop lease", "id", a.id, "err", err)
		return
	}
	p.log.Info("released unadopted loop lease", "id", a.id, "devices", a.devices, "why", why)
}

// reclaim releases the allocations older than the adopt bound at now.
func (p *Plugin) reclaim(now time.Time) {
	for _, a := range p.ledger.takeOlder(now.Add(-p.opts.AdoptTimeout)) {
		p.release(a, fmt.Sprintf("no container adopted it within %s", p.opts.AdoptTimeout))
	}
}

// reclaimLoop runs reclaim until ctx is done.
func (p *Plugin) reclaimLoop(ctx context.Context) {
	t := time.NewTicker(max(p.opts.AdoptTimeout/10, time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.reclaim(p.now())
		}
	}
}
