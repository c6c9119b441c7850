# kiln — build, demo, test.
#
#   make demo   install what kiln needs, convert a sample image, check it
#   make test   install what the tests need and run the whole suite, then
#               each fuzz target briefly
#   make fuzz   run each fuzz target for FUZZTIME (make fuzz FUZZTIME=10m)
#   make bench  run the benchmarks (ratios against plain pipelines)

SHELL := /bin/bash
GO ?= go
BIN := bin
# Expensive test fixtures (containerd build, debootstrap trees, kernels)
# live outside the repository and survive between runs.
export KILN_TEST_CACHE ?= $(HOME)/.cache/kiln-test
DEMO_DIR ?= $(CURDIR)/.cache/demo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Debian packages: what kiln runs (e2fsprogs) and what the tests use
# (gcc: the concurrency tests run kiln serve built with the race detector;
# isal: igzip, which kiln uses for gzip layers where installed, as containerd
# does, and the tests compare with Go's reader).
RUNTIME_PACKAGES := e2fsprogs
TEST_PACKAGES := $(RUNTIME_PACKAGES) debootstrap qemu-system-x86 ca-certificates util-linux runc gcc docker-registry cryptsetup-bin isal

CONTAINERD_TAGS := no_btrfs no_devmapper no_zfs

.PHONY: all build guest demo test test-unit fuzz bench deps-runtime deps-test containerd clean

all: build

build:
	$(GO) build -o $(BIN)/kiln ./cmd/kiln

guest:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/kiln-init ./cmd/kiln-init
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/kiln-agent ./cmd/kiln-agent

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

# Fixtures are fetched with apt-get download (busybox, a cloud kernel): the
# package lists must be there.
define apt_lists
	@apt-cache show busybox-static >/dev/null 2>&1 || $(SUDO) apt-get update -qq
endef

deps-runtime:
	$(call apt_install,$(RUNTIME_PACKAGES))
	$(call apt_lists)

deps-test:
	$(call apt_install,$(TEST_PACKAGES))
	$(call apt_lists)

# The demo builds a small image (Debian's static busybox) as an OCI layout,
# converts it without containerd and checks the result with e2fsck.
demo: deps-runtime build
	$(GO) build -o $(BIN)/kiln-testimage ./integration/cmd/kiln-testimage
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(BIN)/kiln-testimage -image busybox -o $(DEMO_DIR)/layout -tag demo
	$(BIN)/kiln convert oci:$(DEMO_DIR)/layout:demo -o $(DEMO_DIR)/rootfs.ext4 --cache-dir $(DEMO_DIR)/cache --json
	e2fsck -fn $(DEMO_DIR)/rootfs.ext4
	debugfs -R 'ls -l /bin' $(DEMO_DIR)/rootfs.ext4
	@echo "demo: $(DEMO_DIR)/rootfs.ext4 is ready"

# containerd 2.x, ctr, containerd's runc shim and crictl, pinned as tools
# in go.mod, built once into the test cache.
containerd:
	@mkdir -p $(KILN_TEST_CACHE)/bin
	$(GO) build -tags "$(CONTAINERD_TAGS)" -o $(KILN_TEST_CACHE)/bin/containerd github.com/containerd/containerd/v2/cmd/containerd
	$(GO) build -o $(KILN_TEST_CACHE)/bin/ctr github.com/containerd/containerd/v2/cmd/ctr
	$(GO) build -o $(KILN_TEST_CACHE)/bin/containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
	$(GO) build -o $(KILN_TEST_CACHE)/bin/crictl sigs.k8s.io/cri-tools/cmd/crictl

test: deps-test build guest containerd
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 75m ./...
	$(MAKE) --no-print-directory fuzz FUZZTIME=

# Fuzz targets, as package:name:runs. Plain go test runs their seeds and
# what testdata/fuzz holds; fuzzing writes an input that fails there, to
# be kept as a regression once fixed. FUZZTIME is per target; empty (as
# make test runs them), each runs its number of inputs, some 10 s worth
# on 2 cores (FuzzReader about a minute where igzip is installed: each
# gzip input runs it, and its output is checked against Go's): Go 1.26 can fail a run at the end of a -fuzztime duration
# with "context deadline exceeded" and no failing input (its fuzzing
# coordinator's race, go.dev/issue/75804); a count has no deadline.
FUZZTIME ?= 15s
FUZZ_TARGETS := \
	./internal/layer:FuzzReader:5000 \
	./internal/fstree:FuzzApply:400 \
	./internal/ext4write:FuzzWrite:300 \
	./internal/ext4read:FuzzOpenWalk:40 \
	./internal/ext4layer:FuzzLayers:20000 \
	./config:FuzzLoad:15000
fuzz: deps-runtime
	@for t in $(FUZZ_TARGETS); do \
		IFS=: read -r pkg name runs <<< "$$t"; \
		budget="$(FUZZTIME)"; budget=$${budget:-$${runs}x}; \
		echo "fuzzing $$name in $$pkg for $$budget"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $$budget $$pkg || exit 1; \
	done

test-unit:
	$(GO) test -count=1 ./internal/... ./plugin/... ./config/...

# BENCH picks benchmarks by name (make bench BENCH=Shapes); -v prints
# their logs (BenchmarkShapes' table) in full. KILN_BENCH_SHAPES picks
# image shapes and KILN_BENCH_TABLE names a file for the shapes table.
# All of them take about 10 minutes on 2 cores, fixtures cached.
BENCH ?= .
BENCHTIME ?= 3x
bench: deps-test build guest containerd
	$(GO) test -count=1 -v -run '^$$' -bench '$(BENCH)' -benchtime $(BENCHTIME) -timeout 60m ./integration/

clean:
	rm -rf $(BIN) .cache
