// Package registry maps plugin names to the factories of sources and sinks.
// A Registry is a value, so tests can build their own; Default is the one
// plugins add themselves to, with their own flags, from an init function,
// and that the command binds (cmd/guestagent/plugins.go blank-imports every
// plugin).
//
// What the command needs to know of a plugin, it reads here, not from a
// list of names: a source's Rancher Desktop-compatible enable flag and when
// it is on by default (Enable), the flags that take the guest's address
// (GuestAddrFlags), and when --sinks=auto selects a sink (Auto).
package registry

import (
	"cmp"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
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
	// Metrics adds a collector of the plugin's own figures to the agent's
	// /metrics (nil when there is none to add to). Metric names start with
	// guestagent_ and the plugin's name.
	Metrics func(prometheus.Collector)
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
	// WSLIntegration is on while other WSL distributions should reach the
	// ports too (--wslIntegration).
	WSLIntegration bool
	// Entries are where the selected sinks' peers bring the host side's
	// traffic into the guest besides the tunnel (whose interface and
	// address the sources' own flags name): sources that make
	// loopback-only ports reachable, by NAT rules or relays, open them on
	// each of these too.
	Entries []Entry
}

// Entry is an interface of the guest and the guest's address on it,
// through which a sink's peer brings the host side's traffic in
// (wsl-proxy's upstream: veth-rd-ns, 192.168.143.1).
type Entry struct {
	// Sink names the sink whose peer comes in here.
	Sink      string
	Interface string
	Addr      netip.Addr
}

// String renders e as "sink: interface address".
func (e Entry) String() string { return e.Sink + ": " + e.Interface + " " + e.Addr.String() }

// Entrance is implemented by sinks whose peer brings traffic in through an
// entry of its own, not the tunnel's. ok is false when it has none (its
// settings turned it off).
type Entrance interface {
	Entrance() (e Entry, ok bool)
}

// SourceFactory builds a configured source once flags are parsed.
type SourceFactory func(Env) (core.Source, error)

// SinkFactory builds a configured sink once flags are parsed.
type SinkFactory func(Env) (core.Sink, error)

// SourcePlugin describes a source plugin.
type SourcePlugin struct {
	// Name is how --sources and the logs refer to the plugin.
	Name string
	// Summary is one line for --help.
	Summary string
	// Noun says what one of its mappings is, before the mapping's ID, in
	// what 'guestagent explain' prints: "Docker container" gives "Docker
	// container 4f1c…". Empty: "ID of source NAME".
	Noun string
	// Setup defines the plugin's flags on fs and returns the factory, which
	// copies them (and what it needs of Env) into the plugin's Config after
	// parsing and calls its New. Flags are prefixed with the plugin name,
	// except the Rancher Desktop-compatible ones.
	Setup func(fs *pflag.FlagSet) SourceFactory
	// Enable, when set, is the source's Rancher Desktop-compatible enable
	// flag and its defaults; without it the source is on only by
	// --sources.
	Enable *Enable
	// GuestAddrFlags name the flags of Setup that take this guest's
	// address on the virtual network: --tap-interface-ip sets those not
	// given.
	GuestAddrFlags []string
}

// SinkPlugin describes a sink plugin, as SourcePlugin does a source.
type SinkPlugin struct {
	Name    string
	Summary string
	Setup   func(fs *pflag.FlagSet) SinkFactory
	// GuestAddrFlags are as for SourcePlugin.
	GuestAddrFlags []string
	// Auto says whether --sinks=auto (the default) selects the sink with
	// these settings (their Mode, mostly); nil: never.
	Auto func(Options) bool
	// HostPorts is set by sinks that expose ports on the host: the static
	// Kubernetes API mapping, which only a peer inside the VM's network
	// wants, is kept away from them.
	HostPorts bool
}

// Registry holds plugins by name. Its methods are safe for concurrent use.
type Registry struct {
	mu      sync.Mutex
	sources map[string]SourcePlugin
	sinks   map[string]SinkPlugin
}

// New returns an empty registry.
func New() *Registry {
	return &Registry{sources: map[string]SourcePlugin{}, sinks: map[string]SinkPlugin{}}
}

// Default is the registry that plugins register with from init and that
// the command binds.
var Default = New()

// RegisterSource adds a source plugin to Default.
func RegisterSource(p SourcePlugin) { Default.RegisterSource(p) }

// RegisterSink adds a sink plugin to Default.
func RegisterSink(p SinkPlugin) { Default.RegisterSink(p) }

// Bind binds Default's plugins to fs; see Registry.Bind.
func Bind(fs *pflag.FlagSet) (*Bound, error) { return Default.Bind(fs) }

// RegisterSource adds a source plugin. It panics on an empty or duplicate
// name, a missing Setup, or an enable flag without a name or taken by
// another source: all are mistakes in the plugin's code, caught the first
// time the binary runs.
func (r *Registry) RegisterSource(p SourcePlugin) {
	r.mu.Lock()
	defer r.mu.Unlock()
	check("source", p.Name, p.Setup == nil, r.sources)
	if e := p.Enable; e != nil {
		if e.Flag == "" {
			panic(fmt.Sprintf("registry: source plugin %q has an enable flag without a name", p.Name))
		}
		for _, q := range r.sources {
			if q.Enable != nil && q.Enable.Flag == e.Flag {
				panic(fmt.Sprintf("registry: enable flag --%s of source plugin %q is taken by %q", e.Flag, p.Name, q.Name))
			}
		}
		if rd, ok := rancherDesktopFlags[e.Flag]; ok && rd != p.Name {
			panic(fmt.Sprintf("registry: enable flag --%s of source plugin %q is Rancher Desktop's flag for %q", e.Flag, p.Name, rd))
		}
	}
	r.sources[p.Name] = p
}

// RegisterSink adds a sink plugin, with the same rules as RegisterSource.
func (r *Registry) RegisterSink(p SinkPlugin) {
	r.mu.Lock()
	defer r.mu.Unlock()
	check("sink", p.Name, p.Setup == nil, r.sinks)
	r.sinks[p.Name] = p
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
func (r *Registry) Sources() []SourcePlugin {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sorted(r.sources, func(p SourcePlugin) string { return p.Name })
}

// Sinks returns the registered sink plugins sorted by name.
func (r *Registry) Sinks() []SinkPlugin {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sorted(r.sinks, func(p SinkPlugin) string { return p.Name })
}

func sorted[T any](m map[string]T, name func(T) string) []T {
	out := make([]T, 0, len(m))
	for _, p := range m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b T) int { return cmp.Compare(name(a), name(b)) })
	return out
}
