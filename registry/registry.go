// Package registry maps plugin names to the factories of sources and sinks.
// Each plugin registers itself, with its own flags, from an init function;
// package plugins blank-imports them all.
package registry

import (
	"cmp"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"sync"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// Env is what a plugin's constructor receives: a logger and the agent-wide
// settings.
type Env struct {
	Log     *zap.Logger
	Options Options
	// Stdout is the agent's standard output (nil means os.Stdout).
	Stdout io.Writer
}

// Options are the agent-wide settings that plugins may read.
type Options struct {
	// Mode is the networking mode.
	Mode core.Mode
	// K8sServiceListenerAddr is where Kubernetes services bind on the host
	// (0.0.0.0 or 127.0.0.1).
	K8sServiceListenerAddr netip.Addr
	// K8sAPIPort is the Kubernetes API server port.
	K8sAPIPort uint16
}

// SourceFactory builds a configured source once flags are parsed.
type SourceFactory func(Env) (core.Source, error)

// SinkFactory builds a configured sink once flags are parsed.
type SinkFactory func(Env) (core.Sink, error)

// Source describes a source plugin.
type Source struct {
	// Name is how --sources and the logs refer to the plugin.
	Name string
	// Summary is one line for --help.
	Summary string
	// Setup defines the plugin's flags on fs and returns the factory, which
	// reads them after parsing. Flags should be prefixed with the plugin
	// name unless Rancher Desktop's agent named them otherwise.
	Setup func(fs *pflag.FlagSet) SourceFactory
}

// Sink describes a sink plugin.
type Sink struct {
	Name    string
	Summary string
	Setup   func(fs *pflag.FlagSet) SinkFactory
}

var (
	mu      sync.Mutex
	sources = map[string]Source{}
	sinks   = map[string]Sink{}
)

// RegisterSource adds a source plugin. It panics on an empty or duplicate
// name or a missing Setup: both are mistakes in the plugin's code, caught
// the first time the binary runs.
func RegisterSource(p Source) {
	mu.Lock()
	defer mu.Unlock()
	check("source", p.Name, p.Setup == nil, sources)
	sources[p.Name] = p
}

// RegisterSink adds a sink plugin, with the same rules as RegisterSource.
func RegisterSink(p Sink) {
	mu.Lock()
	defer mu.Unlock()
	check("sink", p.Name, p.Setup == nil, sinks)
	sinks[p.Name] = p
}

func check[T any](kind, name string, noSetup bool, m map[string]T) {
	if name == "" {
		panic("registry: " + kind + " plugin without a name")
	}
	if noSetup {
		panic(fmt.Sprintf("registry: %s plugin %q has no Setup", kind, name))
	}
	if _, dup := m[name]; dup {
		panic(fmt.Sprintf("registry: %s plugin %q registered twice", kind, name))
	}
}

// Sources returns the registered source plugins sorted by name.
func Sources() []Source {
	mu.Lock()
	defer mu.Unlock()
	return sorted(sources, func(p Source) string { return p.Name })
}

// Sinks returns the registered sink plugins sorted by name.
func Sinks() []Sink {
	mu.Lock()
	defer mu.Unlock()
	return sorted(sinks, func(p Sink) string { return p.Name })
}

func sorted[T any](m map[string]T, name func(T) string) []T {
	out := make([]T, 0, len(m))
	for _, p := range m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b T) int { return cmp.Compare(name(a), name(b)) })
	return out
}
