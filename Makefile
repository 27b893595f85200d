# moat — build, install, test and benchmark.
#
#   make run        build everything and boot a microVM with the embedded defaults
#   make test       unit tests, fuzzing, KVM plumbing tests, and real-KVM boot tests
#   make bench-boot boot-time / VM-exit / memory comparison with QEMU microvm
#   make bench-vsock vsock echo throughput, moat's hybrid vsock vs QEMU vhost-vsock
#   make bench-run  `moat run` versus runc: start, stdout MB/s, small files on the share
#   make bench-ctr  `ctr run --rm` latency and host memory per idle pod, moat versus runc
#
# Where /dev/kvm cannot boot Linux (PVM), everything that needs a booting guest runs
# inside integration/testhost, an emulated host with real KVM (see README.md).

PREFIX     ?= /usr/local
DESTDIR    ?=
CARGO      ?= cargo
HOST_TRIPLE := x86_64-unknown-linux-gnu
BUILD      := build
GUEST      := $(BUILD)/guest
BIN        := $(BUILD)/bin
SHAREDIR   := $(PREFIX)/share/moat
TESTHOST   := integration/testhost
IMAGES     := $(BUILD)/images

.PHONY: all deps build guest images install run test test-unit test-fuzz test-kvm bench-boot bench-vsock bench-run bench-ctr clean

all: build guest

# Everything a fresh Debian bookworm machine lacks, from Debian's archive. Done once
# per checkout (the stamp), again when this Makefile or the test host changes.
deps: $(BUILD)/.deps
$(BUILD)/.deps: Makefile $(TESTHOST)
	@if ! apt-cache policy linux-source-6.1 2>/dev/null | grep -q Candidate; then apt-get update -qq; fi
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends \
	  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils python3 busybox-static qemu-system-common \
	  libcap-ng-dev libseccomp-dev e2fsprogs >/dev/null
	$(TESTHOST) deps
	@mkdir -p $(BUILD) && touch $@

# The shim binaries (dynamically linked), and, statically linked (there is no musl
# target here), the agent (the guest's only userspace) and the VMM (its jail holds no
# libraries). virtiofsd: the Rust one, built once from crates.io and cached.
build: deps
	$(CARGO) build --release --locked -p moat-shim
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked -p moat-agent -p moat-vmm --target $(HOST_TRIPLE)
	@# A static vsock client the tests run inside containers (not installed).
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked -p moat-integration --bin moat-vsock-probe --target $(HOST_TRIPLE)
	@mkdir -p $(BIN)
	cp target/release/moat target/release/containerd-shim-moat-v2 $(BIN)/
	cp target/$(HOST_TRIPLE)/release/moat-agent target/$(HOST_TRIPLE)/release/moat-vmm target/$(HOST_TRIPLE)/release/moat-vsock-probe $(BIN)/
	rootfs/build-virtiofsd.sh $(BIN)/virtiofsd

guest: build
	rootfs/build-kernel.sh $(GUEST)
	python3 rootfs/mkinitramfs.py $(BIN)/moat-agent $(GUEST)/initramfs.cpio.gz

# Test images from Debian's busybox-static in the three forms `moat run` takes, built
# locally (no registry): an OCI layout, a docker-save tarball and a plain rootfs; and
# the CRI tests' sandbox ("pause") image, as a docker-save tarball.
images: $(IMAGES)/.stamp
$(IMAGES)/.stamp: integration/mkimage.py $(BUILD)/.deps
	python3 integration/mkimage.py oci $(IMAGES)/busybox-oci
	python3 integration/mkimage.py docker-save $(IMAGES)/busybox.tar
	python3 integration/mkimage.py rootfs $(IMAGES)/busybox-rootfs
	python3 integration/mkimage.py pause $(IMAGES)/pause.tar
	@touch $@

install: build guest
	install -D -m 0755 $(BIN)/moat-vmm $(DESTDIR)$(PREFIX)/bin/moat-vmm
	install -D -m 0755 $(BIN)/moat $(DESTDIR)$(PREFIX)/bin/moat
	install -D -m 0755 $(BIN)/containerd-shim-moat-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-moat-v2
	install -D -m 0755 $(BIN)/virtiofsd $(DESTDIR)$(PREFIX)/libexec/moat/virtiofsd
	install -D -m 0644 $(GUEST)/vmlinux $(DESTDIR)$(SHAREDIR)/vmlinux
	install -D -m 0644 $(GUEST)/bzImage $(DESTDIR)$(SHAREDIR)/bzImage
	install -D -m 0644 $(GUEST)/initramfs.cpio.gz $(DESTDIR)$(SHAREDIR)/initramfs.cpio.gz
	@# The host config, every key commented out at its default; an existing one is the
	@# admin's and stays as it is.
	@if [ -e $(DESTDIR)/etc/moat/config.toml ]; then \
	  echo "keeping $(DESTDIR)/etc/moat/config.toml (every key and its default: config/moat.toml.example)"; \
	else \
	  echo "install -D -m 0644 config/moat.toml.example $(DESTDIR)/etc/moat/config.toml"; \
	  install -D -m 0644 config/moat.toml.example $(DESTDIR)/etc/moat/config.toml; \
	fi
	@# containerd's CRI runtime entry: printed, or added with CONTAINERD=apply.
	@if [ "$(CONTAINERD)" = apply ]; then \
	  $(DESTDIR)$(PREFIX)/bin/moat containerd-config --apply $(DESTDIR)/etc/containerd/config.toml; \
	else \
	  echo "For Kubernetes (CRI), containerd's config needs this entry (make install CONTAINERD=apply adds it):"; \
	  $(DESTDIR)$(PREFIX)/bin/moat containerd-config || echo "(see moat containerd-config --help)"; \
	  echo "Then check the host: moat doctor"; \
	fi

# moat's main job on its embedded defaults: run a container (the busybox test image)
# in a microVM and show it ran on the guest's own kernel.
run: build guest images
	$(TESTHOST) run -- sh -c 'echo "host kernel: $$(uname -r)"; \
	  moat run $(IMAGES)/busybox-oci -- sh -c "echo container kernel: \$$(uname -r); id; ls /"'

test: test-unit test-fuzz test-kvm

# Unit tests and the VMM's KVM plumbing tests (tiny guests; they run on any /dev/kvm).
test-unit: guest
	@test -e /dev/kvm || echo "*** WARNING: /dev/kvm is missing: the KVM plumbing tests (vmm/tests/kvm_plumbing.rs) run no guest here ***"
	$(CARGO) test --locked --workspace

# Fuzzing: every cargo-fuzz target (vmm/fuzz, shim/fuzz) built and run for
# MOAT_FUZZ_SECONDS (20) each from its committed seeds; a crash or failed check fails.
# cargo-fuzz and the targets' builds are cached under /var/cache/moat.
test-fuzz: deps
	integration/fuzz.sh

# Real boot tests: every integration test binary (boot, agent, run, ...) runs where
# KVM can boot Linux, one after another in one test host; the first failure stops.
test-kvm: build guest images
	@rm -rf $(BUILD)/test && mkdir -p $(BUILD)/test
	$(CARGO) test --locked -p moat-integration --no-run --message-format=json 2>/dev/null \
	  | python3 -c 'import json,sys; [print(m["executable"], m["target"]["name"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]]' \
	  | while read -r exe name; do cp "$$exe" $(BUILD)/test/"$$name"; done
	@ls $(BUILD)/test | grep -q . || { echo "no integration test binaries were built" >&2; exit 1; }
	@# One test host per Linux-booting test: the emulated host itself freezes or
	@# panics now and then (about 1 in 80 inner VM launches, see ../shared/kvm-in-tcg;
	@# its nested SVM also panicked with "Fatal exception in interrupt" right after a
	@# VMRUN), and testhost's retries (3 boots) then repeat one test, not the suite. The tests that need no booting
	@# guest already ran natively in test-unit. Binaries and guest come from build/.
	@rc=0; for t in $(BUILD)/test/*; do \
	  names=$$("$$t" --list --ignored | sed -n 's/: test$$//p'); \
	  [ -n "$$names" ] || { echo "*** $$t lists no Linux-booting tests" >&2; rc=1; }; \
	  for name in $$names; do \
	    echo "=== $$t $$name"; \
	    MOAT_TESTHOST_NO_INSTALL=1 $(TESTHOST) run --quiet-timeout 480 --attempts 3 -- "$$t" --ignored --exact "$$name" || { rc=1; echo "*** FAILED: $$t $$name"; }; \
	  done; \
	done; exit $$rc

bench-boot: build guest
	$(TESTHOST) run -- python3 integration/bench_boot.py

bench-vsock: build guest
	$(TESTHOST) run -- python3 integration/bench_vsock.py

bench-run: build guest images
	$(TESTHOST) run -- python3 integration/bench_run.py

bench-ctr: build guest images
	$(TESTHOST) run -- python3 integration/bench_ctr.py

clean:
	rm -rf $(BUILD) target
