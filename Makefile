# kiwi-shim build, test and benchmark entry points. Every target that needs
# system packages depends on `deps`, which installs them idempotently, so a
# fresh Debian 12 machine needs nothing but this repository, Go and root.

SHELL     := /bin/bash
GO        ?= go
BIN       := $(CURDIR)/bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
PREFIX    ?= /usr/local
STATICCHECK_VERSION := v0.8.2

# Debian packages the tests drive for real.
DEB_PACKAGES := podman runc conmon uidmap catatonit containernetworking-plugins \
	slirp4netns fuse-overlayfs busybox-static qemu-system-x86 qemu-system-arm qemu-utils fuse3 netavark aardvark-dns \
	debootstrap e2fsprogs fdisk util-linux iproute2 cpio procps

.PHONY: all build deps kernel box test test-e2e test-cgroup2 test-parallel test-tree-on-share test-k8s test-conformance test-unit test-integration lint bench fuzz soak install clean demo

all: build

# kiwi-box-init runs as the guest's PID 1: static, no cgo, one per guest
# architecture (kernel name:GOARCH), embedded in kiwi-shim.
GUEST_ARCHES := x86_64:amd64 aarch64:arm64
INITBIN      := cmd/kiwi-shim/initbin

build:
	@mkdir -p $(BIN)
	@for a in $(GUEST_ARCHES); do \
		echo "kiwi-box-init $${a%%:*}"; \
		CGO_ENABLED=0 GOARCH=$${a##*:} $(GO) build -ldflags "-s -w" -o $(INITBIN)/kiwi-box-init-$${a%%:*} ./cmd/kiwi-box-init || exit 1; \
	done
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/kiwi-shim ./cmd/kiwi-sharefs

# Installs only what is missing; apt-get update runs only then.
deps:
	@if ! dpkg --print-foreign-architectures | grep -qx arm64; then \
		echo "adding the dpkg architecture arm64 (aarch64 guest kernel and test root file system are downloaded, never installed)"; \
		dpkg --add-architecture arm64 && apt-get update -qq; \
	fi
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# A distribution's udev makes /dev/net/tun 0666; a machine without
	@# udev leaves it 0600, and rootless podman's slirp4netns cannot open it.
	@if [ -c /dev/net/tun ] && [ "$$(stat -c %a /dev/net/tun)" != 666 ]; then \
		echo "setting /dev/net/tun to mode 0666, as udev does on a distribution (rootless podman's slirp4netns needs it)"; \
		chmod 0666 /dev/net/tun; \
	fi
	$(GO) mod download

# A guest kernel for VM mode, unpacked into the cache (not installed),
# and its VM template (vm.template = auto: the first box needs not make
# it; aarch64 guests boot cold).
kernel: build
	$(BIN)/kiwi-shim setup --template
	$(BIN)/kiwi-shim setup --arch aarch64

# The default kiwi box (podman image + OCI archive), rebuilt only when its
# recipe changed.
box: deps
	./contrib/box/build

lint:
	test -z "$$(gofmt -l . | tee -a /dev/stderr)"
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

test-unit:
	$(GO) test -race -count=1 ./pkg/... ./cmd/...

# Integration tests share host loop devices, podman and QEMU: one package
# at a time, never in parallel with the unit tests. The suite runs once
# per way a VM box starts named in TEMPLATE_WAYS: restored from a
# template (auto, the default), booted cold (off). make test runs both;
# TEMPLATE_WAYS=auto runs the default way only, in half the time.
TEMPLATE_WAYS ?= auto off
test-integration: build
	@for way in $(TEMPLATE_WAYS); do \
		echo "== integration tests, VM boxes with vm.template = $$way"; \
		KIWI_SHIM_VM_TEMPLATE=$$way KIWI_SHIM_BIN=$(BIN) $(GO) test -count=1 -p 1 -timeout 60m -v ./integration/ || exit 1; \
	done

test: deps build kernel lint test-unit test-integration

# End to end: the bootable description built in VM mode, then booted.
test-e2e: deps build kernel
	KIWI_SHIM_BIN=$(BIN) $(GO) test -tags e2e -count=1 -p 1 -timeout 180m -v -run 'TestE2E' ./integration/

# Container mode on a real cgroup v2 host: a Debian 12 VM (systemd, the
# unified hierarchy, podman, runc; image cached under
# /var/cache/kiwi-shim-test) booted with QEMU, running the container-mode
# tests and a KIWI oem build with each podman cgroup manager. Outside
# make test: far too slow under TCG (see docs/testing.md).
test-cgroup2: deps build box
	KIWI_SHIM_BIN=$(BIN) GO=$(GO) ./contrib/cgroup2/run

# Three VM-mode and three container-mode real KIWI builds at once (loop
# capacity below the demand), then one after another; about an hour
# under TCG. make test runs the container-mode part (TestParallelContainerBuilds).
test-parallel: deps build kernel
	KIWI_SHIM_BIN=$(BIN) $(GO) test -tags parallel -count=1 -p 1 -timeout 180m -v -run 'TestParallelBuilds$$' ./integration/

# KIWI's tree on the virtio-fs share (mapped mode) against the scratch
# disk: the oem description built both ways in VM mode, the images
# compared in content (TestKiwiTreeOnShare, build tag treeshare); 25
# minutes under TCG on a busy machine (2026-12-07: 16 on the share, 9 on
# the scratch disk).
test-tree-on-share: deps build kernel
	KIWI_SHIM_BIN=$(BIN) $(GO) test -tags treeshare -count=1 -p 1 -timeout 180m -v -run 'TestKiwiTreeOnShare$$' ./integration/

# A real two-node Kubernetes cluster on this machine (etcd, API server,
# controller manager, scheduler, two kubelets each with its own
# containerd and kiwi-shim device plugin, RuntimeClass kiwi;
# integration/k8s_cluster_test.go, build tag k8s), kiwi pods in
# container and VM mode on it, Jobs requesting kiwi-shim.io/loop (real
# KIWI builds in both modes; the box image, make demo's). About 25 min
# under TCG on 2 cores (three VM builds at once).
# contrib/k8s/build builds Kubernetes and etcd from the module proxy once
# (nice 19, one compile at a time; long, see docs/testing.md) into
# /var/cache/kiwi-shim-test/k8s/. Outside make test.
test-k8s: deps build kernel
	@k8sbin=$$(./contrib/k8s/build) && \
	KIWI_K8S_BIN=$$k8sbin KIWI_SHIM_BIN=$(BIN) $(GO) test -tags k8s -count=1 -p 1 -timeout 90m -v -run 'TestK8s' ./integration/

# The OCI runtime-tools validation suite against runc and container mode.
test-conformance: deps build
	./contrib/conformance/run $(BIN)/kiwi-shim

bench: deps build kernel
	./contrib/bench/run

# SOAK_VMS (8) VM containers at once for SOAK_ROUNDS (3) rounds: 256 MiB
# written, re-read and checksummed through each share, loop devices in
# each guest; host-side memory printed per round.
soak: deps build kernel
	KIWI_SHIM_BIN=$(BIN) $(GO) test -tags soak -count=1 -p 1 -timeout 60m -v -run 'TestSoak' ./integration/

# Every fuzz target for FUZZTIME (default 60s) each.
fuzz:
	./contrib/fuzz/run

install: build
	install -D -m 0755 $(BIN)/kiwi-shim $(DESTDIR)$(PREFIX)/bin/kiwi-shim
	install -D -m 0755 $(BIN)/kiwi-sharefs $(DESTDIR)$(PREFIX)/bin/kiwi-sharefs
	ln -sf kiwi-shim $(DESTDIR)$(PREFIX)/bin/containerd-shim-kiwi-v2
	install -D -m 0644 contrib/podman/containers.conf $(DESTDIR)/etc/containers/containers.conf.d/50-kiwi-shim.conf

demo: deps build
	./contrib/demo/run

clean:
	rm -rf $(BIN) integration.log $(INITBIN)/kiwi-box-init-*
