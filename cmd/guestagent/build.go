package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// k8sAPISource is the name under which the static Kubernetes API mapping is
// reported.
const k8sAPISource = "k8s-api"

// build checks the configuration and wires the selected plugins into a
// router.
func build(cfg *config, bound *registry.Bound, log *zap.Logger, stdout io.Writer, m *metrics) (*core.Router, error) {
	mode, err := core.ModeFromFlags(cfg.adminInstall, cfg.privSvc)
	if err != nil {
		return nil, err
	}
	listener, err := netip.ParseAddr(cfg.k8sListener)
	if err != nil || (listener != netip.IPv4Unspecified() && listener != netip.AddrFrom4([4]byte{127, 0, 0, 1})) {
		return nil, fmt.Errorf("--k8sServiceListenerAddr %q is invalid: valid options are 0.0.0.0 and 127.0.0.1", cfg.k8sListener)
	}
	if cfg.k8sAPIPort < 1 || cfg.k8sAPIPort > 65535 {
		return nil, fmt.Errorf("--k8sAPIPort %d is out of range 1-65535", cfg.k8sAPIPort)
	}
	var addMetrics func(prometheus.Collector)
	if m != nil {
		addMetrics = m.add
	}
	env := registry.Env{Log: log, Stdout: stdout, Metrics: addMetrics, Options: registry.Options{
		Mode:                   mode,
		K8sServiceListenerAddr: listener,
		K8sAPIPort:             uint16(cfg.k8sAPIPort),
		WSLIntegration:         cfg.wslIntegration,
	}}

	sourceNames := dedupe(append(bound.EnabledSources(mode, cfg.changed), cfg.sources...))
	if len(sourceNames) == 0 {
		return nil, fmt.Errorf("no source enabled: use %s or --sources NAME", strings.Join(bound.EnableFlags(), ", "))
	}
	var sinkNames []string
	for _, n := range cfg.sinks {
		if n == "auto" {
			sinkNames = append(sinkNames, bound.AutoSinks(env.Options)...)
		} else {
			sinkNames = append(sinkNames, n)
		}
	}
	sinkNames = dedupe(sinkNames)
	if len(sinkNames) == 0 {
		return nil, errors.New("no sink selected: --sinks is empty")
	}

	router := core.NewRouter(core.RouterConfig{
		Log:          log,
		Policy:       mode.Policy(),
		DrainTimeout: drainTimeout(cfg.unexposeOnExit),
		StateDir:     cfg.stateDir,
		Delivered:    m.delivered,
	})
	// The sinks first: the entries of their peers into the guest are
	// what the sources open loopback-only ports on.
	sinks := make([]core.Sink, len(sinkNames))
	var entries []string
	for i, n := range sinkNames {
		if sinks[i], err = bound.NewSink(n, env); err != nil {
			return nil, err
		}
		if e, ok := sinks[i].(registry.Entrance); ok {
			if entry, ok := e.Entrance(); ok {
				env.Options.Entries = append(env.Options.Entries, entry)
				entries = append(entries, entry.String())
			}
		}
	}
	for _, n := range sourceNames {
		src, err := bound.NewSource(n, env)
		if err != nil {
			return nil, err
		}
		router.AddSource(n, src)
	}
	if bound.K8sAPI() {
		router.AddSource(k8sAPISource, k8sAPIMapping(uint16(cfg.k8sAPIPort)))
	}
	for i, n := range sinkNames {
		router.AddSink(n, sinks[i], acceptFor(bound, n))
	}
	log.Info("configuration",
		zap.Stringer("mode", mode),
		zap.Strings("sources", sourceNames),
		zap.Strings("sinks", sinkNames),
		zap.Strings("entries", entries))
	return router, nil
}

func drainTimeout(on bool) time.Duration {
	if on {
		return 5 * time.Second
	}
	return 0
}

// acceptFor keeps the static Kubernetes API mapping away from the sinks
// that expose ports on the host (registry.SinkPlugin.HostPorts): only
// wsl-proxy (and the debugging sinks) want it.
func acceptFor(b *registry.Bound, sink string) func(core.Key) bool {
	if b.HostPorts(sink) {
		return func(k core.Key) bool { return k.Source != k8sAPISource }
	}
	return nil
}

// k8sAPIMapping reports the one static mapping of the Kubernetes API port.
func k8sAPIMapping(port uint16) core.Source {
	return core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
		out.Snapshot([]core.Mapping{{
			Key: core.Key{ID: "api-server"},
			Ports: []core.Port{{
				Protocol: core.TCP, ContainerPort: port,
				HostIP: netip.AddrFrom4([4]byte{127, 0, 0, 1}), HostPort: port,
			}},
		}})
		<-ctx.Done()
		return nil
	})
}

func dedupe(names []string) []string {
	var out []string
	for _, n := range names {
		n = strings.TrimSpace(n)
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}
