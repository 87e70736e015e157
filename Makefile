GO ?= go
BIN := bin/nodespawn

.PHONY: build test check dry-run
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) .

# The fleet controller (cmd/nodespawn-controller), its own binary: the
# nodespawn binary never links controller-runtime.
.PHONY: controller
controller:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/nodespawn-controller ./cmd/nodespawn-controller

# CGO_CFLAGS quiets go-nvml's deprecation warnings in cgo builds.
export CGO_CFLAGS ?= -Wno-deprecated-declarations

# The nodespawn.dev API's deep copies and CRDs come from api/v1alpha1 by
# controller-gen (a go tool in go.mod), each CRD under the header in
# api/v1alpha1/crd-header.txt; generate-check fails when they are stale.
.PHONY: generate generate-check
generate:
	$(GO) tool controller-gen object paths=./api/... crd:headerFile=api/v1alpha1/crd-header.txt paths=./api/... output:crd:artifacts:config=deploy/crds
generate-check:
	@tmp=$$(mktemp -d) && trap 'cp "$$tmp/dc.go" api/v1alpha1/zz_generated.deepcopy.go; rm -rf "$$tmp"' EXIT && \
	cp api/v1alpha1/zz_generated.deepcopy.go "$$tmp/dc.go" && \
	$(GO) tool controller-gen object paths=./api/... crd:headerFile=api/v1alpha1/crd-header.txt paths=./api/... output:crd:artifacts:config=$$tmp/crds && \
	cmp -s api/v1alpha1/zz_generated.deepcopy.go "$$tmp/dc.go" && diff -r deploy/crds "$$tmp/crds" >/dev/null || \
	{ echo "api/v1alpha1's deep copies or deploy/crds are stale: run 'make generate' and commit" >&2; exit 1; }

test: generate-check
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "gofmt needed: $$out" >&2; exit 1; }
	@out=$$($(GO) mod tidy -diff 2>&1) || { printf '%s\n' "$$out" >&2; echo "go.mod/go.sum are not tidy (the diff or the error above): run 'go mod tidy' and commit the result" >&2; exit 1; }
	$(GO) vet -race ./...
	CGO_ENABLED=0 $(GO) vet -trimpath ./...
	CGO_ENABLED=0 $(GO) build -trimpath -o /dev/null .
	$(GO) test -race ./...

# vet compiles what it checks against (export data) as the tests do
# (-race) and as the no-cgo builds do (-trimpath, like e2e-prepare's
# nodespawn, controller and test binary), so each configuration of the tree
# is compiled once. Measured cold on 2 cores (2026-12-06): a plain
# `go vet ./...` was a third compile of the tree, 654 CPU-s, and
# e2e-prepare's no-cgo -trimpath builds of nodespawn and the controller
# 592 CPU-s that nothing shared. No file here has a race build tag, so vet
# -race sees the same sources.

# The tests that need a real kube-apiserver and etcd (internal/kubetest):
# those of every package whose tests import internal/kubetest, and
# kubetest's own. `make test` runs them too, but skips them when no control
# plane is found; here NODESPAWN_REQUIRE_KUBE=1 makes that a failure. The
# binaries come from the e2e cache's components build, which e2e-prepare
# makes (warm: seconds), or from KUBEBUILDER_ASSETS, which skips
# e2e-prepare.
KUBETEST_PKGS = $(shell $(GO) list -f '{{.ImportPath}}{{range .TestImports}} {{.}}{{end}}{{range .XTestImports}} {{.}}{{end}}' ./... | awk '/\/internal\/kubetest( |$$)/ {print $$1}')
.PHONY: test-cluster
test-cluster: $(if $(KUBEBUILDER_ASSETS),,e2e-prepare)
	@pkgs="$(KUBETEST_PKGS)"; test -n "$$pkgs" || { echo "test-cluster: no package's tests import internal/kubetest" >&2; exit 1; }; \
	echo "NODESPAWN_REQUIRE_KUBE=1 $(GO) test -race $$pkgs"; \
	NODESPAWN_REQUIRE_KUBE=1 $(GO) test -race $$pkgs

# Everything CI runs: the packages the tests need (installed when missing,
# as root on Debian; scripts/install-test-deps.sh says which), then the unit
# and integration tests, then the e2e cache (kube-apiserver and etcd among
# the components it builds), the tests against a real API server with it,
# then the VM test.
.PHONY: deps
deps:
	scripts/install-test-deps.sh

# The unit tests run beside e2e-prepare (-j2), which cold takes ~53 min
# (2026-12-06, 2 cores; the whole cold check 78 min 52 s, e2e/README.md).
# That pass skips the tests against an API server (NODESPAWN_SKIP_KUBE=1:
# cold, their control plane is still being built); test-cluster runs them
# next, once. A failing unit test still waits for e2e-prepare to end.
check: deps
	$(MAKE) -j2 test-unit e2e-prepare
	$(MAKE) test-cluster
	$(MAKE) e2e

.PHONY: test-unit
test-unit:
	NODESPAWN_SKIP_KUBE=1 $(MAKE) test

dry-run: build
	./$(BIN) apply --dry-run -f examples/minimal.yaml

# End-to-end test: a TCG VM boots with the manifest in its NoCloud user-data
# and nodespawn makes the node (e2e/README.md). Needs root and the packages
# listed there; caches under $(E2E_CACHE) (default /var/cache/nodespawn-e2e).
.PHONY: e2e e2e-prepare
e2e-prepare:
	e2e/prepare.sh
e2e: e2e-prepare
	e2e/run.sh $(E2E_ARGS)

# Machine rootfs images with a container engine (buildah, podman or docker).
# Without one: images/build-rootfs.sh DIR && nodespawn image build --rootfs DIR --ref REF.
ENGINE ?= $(shell command -v buildah || command -v podman || command -v docker)
IMAGE_REPO ?= ghcr.io/nodespawn
IMAGE_TAG ?= noble
.PHONY: images
images:
	@test -n "$(ENGINE)" || { echo "images: no container engine (buildah, podman, docker); use images/build-rootfs.sh and 'nodespawn image build'" >&2; exit 1; }
	$(ENGINE) build -f images/base/Containerfile -t $(IMAGE_REPO)/base:$(IMAGE_TAG) images/base
	$(ENGINE) build -f images/nvidia/Containerfile --build-arg BASE=$(IMAGE_REPO)/base:$(IMAGE_TAG) -t $(IMAGE_REPO)/nvidia:$(IMAGE_TAG) images/nvidia

# Rootfs pull benchmark (not a test): packs a real distribution tree (the
# e2e cache's Debian machine tree plus its node components, ~0.9 GB; read
# only) into 6 layers (40% of the bytes in the first, 3% in the last, which
# image B changes, 14% in each other),
# pushes it (image A) and a copy with its last layer changed (image B) to
# Debian's docker-registry on loopback, and measures, each in a child:
# floor (curl | tar, syncfs), twopass (OCI layout, synced, then unpack,
# synced), stream (flattened oci.Pull), store (empty layer store:
# PullLayers + overlayfs Compose), store-b (same for B) and store-upgrade
# (A's layers held, pull and compose B); wall, CPU, peak RSS and bytes
# written per way, then the goals (store <= 0.9x twopass, store <= 1.1x
# floor, upgrade >= 10x faster than store-b, peak RSS < 100 MiB). Every way
# ends with a syncfs. Needs root, overlayfs and docker-registry; ~5 min.
# BENCH_ARGS e.g. "-runs 1", "-ways floor,store", "-rootfs /some/tree -add
# none -layers 4 -first-pct 70 -last-pct 5", or "-rootfs synthetic -layers 6 -layer-mb
# 60" (also the fallback without the e2e cache). BENCH_CPUPROFILE=DIR
# writes each way's CPU profile to DIR.
.PHONY: bench
bench:
	$(GO) build -o bin/ocibench ./tools/ocibench
	./bin/ocibench $(BENCH_ARGS)

# Start-up benchmark (not a test): builds BENCH_BASE (default: the last
# tag, else HEAD~) and this tree the same way, runs `version` and
# `apply --dry-run -f examples/minimal.yaml` with each alternately and
# prints medians of wall, CPU and package init time.
BENCH_BASE ?= $(shell git describe --tags --abbrev=0 2>/dev/null || echo HEAD~)
.PHONY: bench-startup
bench-startup:
	$(GO) run ./tools/benchstartup -base $(BENCH_BASE) $(BENCH_ARGS)

# Fleet controller benchmark (not a test): 1,000 fake Nodes and fast fake
# agents on a real kube-apiserver and etcd (internal/kubetest; after
# e2e-prepare), one rollout with maxUnavailable 10% to Complete; prints
# wall and CPU time, reconciles, mean and p99 rollout-reconcile latency and
# peak heap.
.PHONY: bench-controller
bench-controller:
	NODESPAWN_REQUIRE_KUBE=1 $(GO) test -run XXX -bench BenchmarkRollout1000Nodes -benchtime 1x -timeout 15m ./internal/fleet/controller/
