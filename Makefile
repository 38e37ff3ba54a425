# guestagent build and test entry points. `make help` lists them.

GO          ?= go
BIN         := $(CURDIR)/bin
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
STATICCHECK := $(BIN)/staticcheck
STATICCHECK_VERSION := v0.8.2
GVPROXY     := $(BIN)/gvproxy
GVPROXY_VERSION := v0.8.9
# Extra flags for `make run`, e.g. make run RUN_ARGS=--debug
RUN_ARGS    ?=
# The demo source: the static file, plus Docker when its socket is there.
RUN_SOURCES := static$(if $(wildcard /var/run/docker.sock),$(if $(wildcard sources/docker),$(comma)docker))
comma       := ,

.PHONY: help build run test lint vet staticcheck unit engines bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build bin/guestagent
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/guestagent ./cmd/guestagent

run: build ## run the agent on the demo mappings, printing every change as JSON
	$(BIN)/guestagent --sinks=stdout --sources=$(RUN_SOURCES) \
		--staticFile=testdata/static/demo.json $(RUN_ARGS)

test: lint unit ## vet, staticcheck, then every test with -race

unit: engines ## every test with -race, against the real engines and peers
	GUESTAGENT_REQUIRE_ENGINES=1 GUESTAGENT_GVPROXY=$(GVPROXY) \
		$(GO) test -race -count=1 ./...

# The real peers and engines the integration tests use.
engines: $(GVPROXY)

$(GVPROXY):
	GOBIN=$(BIN) $(GO) install github.com/containers/gvisor-tap-vsock/cmd/gvproxy@$(GVPROXY_VERSION)

lint: vet staticcheck

vet:
	$(GO) vet ./...

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

bench: ## run the benchmarks and print their figures
	$(GO) test -run '^$$' -bench . -benchmem ./...

clean:
	rm -rf $(BIN)
