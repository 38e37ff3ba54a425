package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

type probeSink struct{}

func (probeSink) Send(context.Context, core.Change) error { return nil }

// probeRegistry holds plugins the command does not know: a source with its
// own enable flag, on by default in network-tunnel mode, and a sink that
// --sinks=auto selects in every mode.
func probeRegistry() *registry.Registry {
	r := registry.New()
	r.RegisterSource(registry.SourcePlugin{
		Name: "probe", Summary: "a source the command does not name",
		Enable:         &registry.Enable{Flag: "probe", Usage: "turn the probe on", Modes: []core.Mode{core.ModeTunnel}},
		GuestAddrFlags: []string{"probeAddr"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			fs.String("probeAddr", "192.168.127.2", "the guest's address")
			return func(env registry.Env) (core.Source, error) {
				if env.Metrics != nil {
					env.Metrics(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "guestagent_probe_answer", Help: "A figure of the probe's own."},
						func() float64 { return 42 }))
				}
				return core.SourceFunc(func(ctx context.Context, _ core.Emitter) error { <-ctx.Done(); return nil }), nil
			}
		},
	})
	r.RegisterSink(registry.SinkPlugin{
		Name: "probe-sink", Summary: "a sink the command does not name",
		Auto: func(registry.Options) bool { return true },
		Setup: func(*pflag.FlagSet) registry.SinkFactory {
			return func(registry.Env) (core.Sink, error) { return probeSink{}, nil }
		},
	})
	return r
}

// TestPluginMetricsReachTheEndpoint builds the agent with a source that
// adds a collector of its own: /metrics serves its figure.
func TestPluginMetricsReachTheEndpoint(t *testing.T) {
	m := newMetrics()
	if _, _, err := buildProbeWith(t, m, "--probe"); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	statusHandler(&snapshots{r: core.NewRouter(core.RouterConfig{})}, m, zap.NewNop()).
		ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if !strings.Contains(rec.Body.String(), "guestagent_probe_answer 42") {
		t.Errorf("/metrics lacks the plugin's figure:\n%s", rec.Body.String())
	}
}

// buildProbe parses args against probeRegistry and builds the agent,
// returning the sources and sinks of its configuration line.
func buildProbe(t *testing.T, args ...string) (sources, sinks []string, err error) {
	t.Helper()
	return buildProbeWith(t, newMetrics(), args...)
}

// buildProbeWith is buildProbe with the metrics m.
func buildProbeWith(t *testing.T, m *metrics, args ...string) (sources, sinks []string, err error) {
	t.Helper()
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	cfg := defineFlags(fs)
	b, err := probeRegistry().Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse(append([]string{"--stateDir="}, args...)); err != nil {
		t.Fatal(err)
	}
	if err := applyGuestIP(fs, b, cfg.tapIP); err != nil {
		t.Fatal(err)
	}
	logs, obs := observer.New(zap.InfoLevel)
	if _, err := build(cfg, b, zap.New(logs), nil, m); err != nil {
		return nil, nil, err
	}
	for _, e := range obs.FilterMessage("configuration").All() {
		ctx := e.ContextMap()
		for _, n := range ctx["sources"].([]any) {
			sources = append(sources, n.(string))
		}
		for _, n := range ctx["sinks"].([]any) {
			sinks = append(sinks, n.(string))
		}
	}
	return sources, sinks, nil
}

// TestPluginDeclarationsReachTheCommand checks that a plugin of a
// registry the command has never heard of gets its enable flag, its
// default in network-tunnel mode, its place in --sinks=auto, its guest
// address from --tap-interface-ip and its line in --help.
func TestPluginDeclarationsReachTheCommand(t *testing.T) {
	sources, sinks, err := buildProbe(t, "--adminInstall")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sources, []string{"probe"}) || !slices.Equal(sinks, []string{"probe-sink"}) {
		t.Errorf("network tunnel: sources %v, sinks %v; want the probe's default and its sink", sources, sinks)
	}
	if sources, _, err := buildProbe(t, "--probe"); err != nil || !slices.Equal(sources, []string{"probe"}) {
		t.Errorf("--probe: sources %v, %v", sources, err)
	}
	if _, _, err := buildProbe(t, "--adminInstall", "--probe=false"); err == nil || !strings.Contains(err.Error(), "no source enabled: use --probe or --sources NAME") {
		t.Errorf("--probe=false in network-tunnel mode: %v, want no source and the probe's flag named", err)
	}

	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	cfg := defineFlags(fs)
	b, err := probeRegistry().Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse([]string{"--tap-interface-ip=192.168.127.9"}); err != nil {
		t.Fatal(err)
	}
	if err := applyGuestIP(fs, b, cfg.tapIP); err != nil {
		t.Fatal(err)
	}
	if got := fs.Lookup("probeAddr").Value.String(); got != "192.168.127.9" {
		t.Errorf("--probeAddr = %s, want the --tap-interface-ip address", got)
	}
	var help strings.Builder
	usage(&help, cfg, b)
	var line string
	for _, l := range strings.Split(help.String(), "\n") {
		if strings.Contains(l, "turn the probe on") {
			line = strings.TrimSpace(l)
		}
	}
	if !strings.HasPrefix(line, "--probe[") {
		t.Errorf("--help lacks the probe's enable flag:\n%s", help.String())
	}
}
