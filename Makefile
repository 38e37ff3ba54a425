# guestagent build and test entry points. `make help` lists them.

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
GO          ?= go
BIN         := $(CURDIR)/bin
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
# grpcnotrace is gRPC's own switch that leaves out its golang.org/x/net/trace
# support, which the agent never turns on; its templates keep every exported
# method in the binary (4.4 MiB).
BUILD_TAGS  := grpcnotrace
GOFMT       ?= gofmt
STATICCHECK := $(BIN)/staticcheck
STATICCHECK_VERSION := v0.8.2
GVPROXY     := $(BIN)/gvproxy
GVPROXY_VERSION := v0.8.9
# gvisor-tap-vsock's guest side (its cmd/vm), for the tests' tap path.
GVFORWARDER := $(BIN)/gvforwarder
# kube-apiserver takes minutes to build, so it is cached across runs.
KUBE_VERSION   := v1.37.2
KUBE_CACHE     ?= $(HOME)/.cache/guestagent/k8s-$(KUBE_VERSION)
KUBE_APISERVER := $(KUBE_CACHE)/kube-apiserver
# Extra flags for `make run`, e.g. make run RUN_ARGS=--debug
RUN_ARGS    ?=
# The demo source: the static file, plus Docker when its socket is there.
RUN_SOURCES := static$(if $(wildcard /var/run/docker.sock),$(comma)docker --dockerLoopbackNAT=false)
comma       := ,

.PHONY: help build plugin-list run check test integration test-faults fuzz-short lint gofmt vet staticcheck engines fuzz bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# PLUGINS, when set, builds an agent with only the plugins it names, as
# package paths: PLUGINS="sources/docker sinks/stdout". The host-switch,
# wsl-proxy and vtunnel sinks are always in (the networking modes name
# them). Go initialises every package linked in, enabled or not, so an agent
# built for one engine holds less memory. The list goes to Go as a file
# added by -overlay (cmd/guestagent/plugins.go steps aside under the build
# tag custom); the tree is not changed.
PLUGINS     ?=
ifneq ($(strip $(PLUGINS)),)
PLUGIN_DIR  := $(BIN)/plugins
GO_BUILD    = $(GO) build -trimpath -tags '$(BUILD_TAGS) custom' -overlay $(PLUGIN_DIR)/overlay.json -ldflags '$(LDFLAGS)'
else
GO_BUILD    = $(GO) build -trimpath -tags '$(BUILD_TAGS)' -ldflags '$(LDFLAGS)'
endif

# Static (no cgo), as make dist builds the release binaries: the agent uses
# no C library, and a dynamic one would map libc as well.
build: $(if $(strip $(PLUGINS)),plugin-list) ## build bin/guestagent, static; PLUGINS="sources/docker ..." builds one with only those plugins
	CGO_ENABLED=0 $(GO_BUILD) -o $(BIN)/guestagent ./cmd/guestagent

.PHONY: plugin-list
plugin-list: ## write the overlay that builds only $(PLUGINS) (used by build and dist)
	@mkdir -p $(PLUGIN_DIR)
	@{ printf '//go:build custom\n\npackage main\n\n// The plugins of this build: %s.\nimport (\n' '$(strip $(PLUGINS))'; \
	  for p in $(PLUGINS); do \
	    [ -d "$(CURDIR)/$$p" ] || { echo "PLUGINS: no plugin package $$p (want paths such as sources/docker)" >&2; exit 1; }; \
	    printf '\t_ "github.com/guestagent/guestagent/%s"\n' "$$p"; \
	  done; printf ')\n'; } > $(PLUGIN_DIR)/plugins_custom.go
	@printf '{"Replace":{"%s":"%s"}}\n' "$(CURDIR)/cmd/guestagent/plugins_custom.go" "$(PLUGIN_DIR)/plugins_custom.go" > $(PLUGIN_DIR)/overlay.json

# Release binaries: static (no cgo), for the distribution image's platforms.
DIST           ?= $(CURDIR)/dist
DIST_PLATFORMS := linux/amd64 linux/arm64

.PHONY: dist
dist: $(if $(strip $(PLUGINS)),plugin-list) ## build static linux/amd64 and linux/arm64 binaries and their SHA256SUMS into dist/ (PLUGINS as for build)
	@mkdir -p $(DIST)
	@set -e; for p in $(DIST_PLATFORMS); do \
		os=$${p%/*}; arch=$${p#*/}; \
		echo "building $(DIST)/guestagent-$$os-$$arch"; \
		CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO_BUILD) \
			-o $(DIST)/guestagent-$$os-$$arch ./cmd/guestagent; \
	done
	cd $(DIST) && sha256sum $(foreach p,$(DIST_PLATFORMS),guestagent-$(subst /,-,$(p))) > SHA256SUMS

run: build ## run the agent on the demo mappings, printing every change as JSON
	$(BIN)/guestagent --sinks=stdout --sources=$(RUN_SOURCES) \
		--staticFile=testdata/static/demo.json $(RUN_ARGS)

# The inner loop: formatting, vet, staticcheck and the tests that need no
# engine, root or built program (go test -short skips those).
check: gofmt vet staticcheck ## gofmt, vet, staticcheck and the tests that need no engine (go test -short): the quick loop
	$(GO) test -short -count=1 ./...

test: lint integration fuzz-short ## gofmt, vet, staticcheck, every test with -race against the engines, then each fuzz target briefly

# Where the tests find the engines; a missing one fails them.
ENGINE_ENV  := GUESTAGENT_REQUIRE_ENGINES=1 GUESTAGENT_GVPROXY=$(GVPROXY) GUESTAGENT_GVFORWARDER=$(GVFORWARDER) GUESTAGENT_KUBE_APISERVER=$(KUBE_APISERVER)

integration: engines ## every test with -race, against the real engines and peers
	$(ENGINE_ENV) $(GO) test -race -count=1 -timeout 20m ./...

FAULT_ROUNDS ?= 30

test-faults: engines ## the fault-injection convergence suite, FAULT_ROUNDS rounds (default 30), with its summary table
	$(ENGINE_ENV) GUESTAGENT_FAULT_ROUNDS=$(FAULT_ROUNDS) $(GO) test -race -count=1 -timeout 60m -v -run '^TestFaultConvergence$$' ./cmd/guestagent/

# Debian packages of the engines the integration tests start (on private
# sockets, in network namespaces of their own).
APT_PACKAGES := docker.io containerd runc iptables nftables iproute2 util-linux \
	containernetworking-plugins conntrack etcd-server file busybox openrc logrotate libcap2-bin
ENGINE_BINARIES := dockerd containerd runc iptables nft ip nsenter setpriv etcd file busybox openrc-run logrotate capsh

# The real peers and engines the integration tests use; installed with
# apt-get when run as root and missing.
engines: $(GVPROXY) $(GVFORWARDER) $(KUBE_APISERVER) ## install the engines and peers the integration tests use (apt-get when root)
	@missing=""; for b in $(ENGINE_BINARIES); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing engines (missing:$$missing)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
		else \
			echo "missing:$$missing; run make test as root to install them" >&2; \
		fi; \
	fi

$(KUBE_APISERVER):
	.ci/build-kube $(KUBE_VERSION) $(KUBE_CACHE)

$(GVPROXY):
	GOBIN=$(BIN) $(GO) install github.com/containers/gvisor-tap-vsock/cmd/gvproxy@$(GVPROXY_VERSION)

# go install names the binary vm, after its package directory.
$(GVFORWARDER):
	@mkdir -p $(BIN)
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
		GOBIN=$$d $(GO) install github.com/containers/gvisor-tap-vsock/cmd/vm@$(GVPROXY_VERSION) && mv "$$d/vm" $@

lint: gofmt vet staticcheck ## gofmt, vet and staticcheck

gofmt: ## fail, listing them, if any Go file is not gofmt-formatted
	@files=$$($(GOFMT) -l .); if [ -n "$$files" ]; then \
		echo "not gofmt-formatted (run gofmt -w on them):" >&2; echo "$$files" >&2; exit 1; \
	fi

vet: ## go vet every package
	$(GO) vet ./...

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK) ## run staticcheck (installed into bin/ on first use) on every package
	$(STATICCHECK) ./...

FUZZTIME ?= 30s
# Every Fuzz function in the tree, as package-dir:FuzzName.
FUZZ_TARGETS = $(shell grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' . | \
	sed -E 's|^\./(.*)/[^/]*:func (Fuzz.*)|\1:\2|' | sort -u)

# Go 1.26's fuzzing coordinator can report "context deadline exceeded" as
# a failure when -fuzztime ends while a worker is busy (go.dev/issue/75804,
# fixed in Go 1.27). Such a run wrote no failing input; it is run once more,
# and any other failure, or the same one twice, fails.
fuzz: ## run every fuzz target for FUZZTIME (default 30s) each
	@log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t#*:}; \
		for try in 1 2; do \
			echo "== $$pkg $$name"; \
			if $(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) ./$$pkg/ 2>&1 | tee "$$log"; then break; fi; \
			if [ $$try = 1 ] && grep -q 'context deadline exceeded' "$$log" && \
				! grep -q -e 'Failing input written' -e 'panic:' "$$log"; then \
				echo "== $$pkg $$name: the fuzzing engine's deadline race (go.dev/issue/75804), no failing input; once more"; \
				continue; \
			fi; \
			exit 1; \
		done; \
	done

fuzz-short: ## run every fuzz target for 3s each (part of make test)
	@$(MAKE) --no-print-directory fuzz FUZZTIME=3s

# Benchmarks: the NAT rule scan and parse (timed by the benchmark loop), then
# the measurements against the real engines (one run each: event-to-sink
# latency per source, a burst of containers, idle cost of the agent, and the
# agent's own ceiling).
BENCH_MICRO := ^Benchmark(Scan|Parse)
BENCH_MACRO := ^Benchmark(DeliveryLatency|Burst|Idle|CPU|Ceiling|ForeignFlood|Relay)

bench: engines ## run the benchmarks against the real engines and print a table of their figures (also in bin/bench.txt)
	@mkdir -p $(BIN)
	$(ENGINE_ENV) $(GO) test -run '^$$' -bench '$(BENCH_MICRO)' -benchmem -timeout 60m ./... | tee $(BIN)/bench.txt
	$(ENGINE_ENV) $(GO) test -run '^$$' -bench '$(BENCH_MACRO)' -benchtime 1x -timeout 60m ./... | tee -a $(BIN)/bench.txt
	@.ci/bench-table $(BIN)/bench.txt

clean: ## remove bin/ (the tools and binaries built into it)
	rm -rf $(BIN)
