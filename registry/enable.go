package registry

import (
	"fmt"
	"maps"
	"slices"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
)

// Enable declares a source's Rancher Desktop-compatible enable flag
// (--docker, --sockets, ...) and when the source is on without --sources.
type Enable struct {
	// Flag is the flag's name, unprefixed, as Rancher Desktop passes it.
	Flag string
	// Usage is the flag's --help text; it should say the default when
	// Modes or ImpliedBy set it.
	Usage string
	// Modes are the networking modes the source is on in while the flag
	// is not given; given, its value decides. Nil: off unless given.
	Modes []core.Mode
	// ImpliedBy names another source whose enable flag turns this one on
	// too. The flag then defaults to true, and given false it keeps the
	// source off; on its own it turns nothing on.
	ImpliedBy string
	// K8sAPI: while the flag is on, the agent also reports the static
	// mapping of the Kubernetes API port (--k8sAPIPort).
	K8sAPI bool
}

// rancherDesktopFlags are the enable flags Rancher Desktop passes to every
// agent, by the source each one enables. A build that leaves the source
// out (make build PLUGINS=...) still takes its flag: false is accepted,
// true is refused as a source this build lacks.
var rancherDesktopFlags = map[string]string{
	"docker": "docker", "containerd": "containerd", "kubernetes": "kubernetes",
	"iptables": "iptables", "sockets": "sockets",
}

// enabler is a bound enable flag.
type enabler struct {
	Enable
	source string
	on     *bool
	absent bool // the source is not in this build
}

// bindEnables defines the enable flags of r's sources (and the placeholders
// of Rancher Desktop's flags whose source this build lacks) on
// b.Enabling, and checks that each implied source is there.
func (b *Bound) bindEnables(sources []SourcePlugin) error {
	b.Enabling = pflag.NewFlagSet("sources", pflag.ContinueOnError)
	have := map[string]bool{}
	for _, p := range sources {
		have[p.Name] = true
	}
	for _, p := range sources {
		e := p.Enable
		if e == nil {
			continue
		}
		if e.ImpliedBy != "" {
			implier := slices.IndexFunc(sources, func(q SourcePlugin) bool { return q.Name == e.ImpliedBy && q.Enable != nil })
			if implier < 0 {
				// A build without the implying source has no flag to turn
				// this one on: it stays off.
				if have[e.ImpliedBy] {
					return fmt.Errorf("source %s: --%s is implied by source %q, which has no enable flag", p.Name, e.Flag, e.ImpliedBy)
				}
				if _, known := rancherDesktopFlags[e.ImpliedBy]; !known {
					return fmt.Errorf("source %s: --%s is implied by source %q, which is not registered", p.Name, e.Flag, e.ImpliedBy)
				}
			}
		}
		b.enables = append(b.enables, &enabler{Enable: *e, source: p.Name, on: b.Enabling.Bool(e.Flag, e.ImpliedBy != "", e.Usage)})
	}
	for _, flag := range slices.Sorted(maps.Keys(rancherDesktopFlags)) {
		if src := rancherDesktopFlags[flag]; b.Enabling.Lookup(flag) == nil && !have[src] {
			b.enables = append(b.enables, &enabler{Enable: Enable{Flag: flag}, source: src, absent: true,
				on: b.Enabling.Bool(flag, false, fmt.Sprintf("enable source %s, which this build leaves out (true is an error)", src))})
		}
	}
	return nil
}

// EnabledSources returns the sources the enable flags turn on in mode,
// given which flags the command line set (fs.Changed). A source this build
// leaves out is in it when its flag is given true, so that building it
// fails with a clear error.
func (b *Bound) EnabledSources(mode core.Mode, changed func(flag string) bool) []string {
	var names []string
	for _, e := range b.enables {
		on := *e.on
		switch {
		case e.ImpliedBy != "":
			on = on && b.flagOn(e.ImpliedBy)
		case e.Modes != nil && !changed(e.Flag):
			on = slices.Contains(e.Modes, mode)
		}
		if on {
			names = append(names, e.source)
		}
	}
	return names
}

// K8sAPI reports whether the enable flag of a source that declares K8sAPI
// is on.
func (b *Bound) K8sAPI() bool {
	for _, e := range b.enables {
		if e.K8sAPI && *e.on {
			return true
		}
	}
	return false
}

// EnableFlags returns the names of the enable flags of this build's
// sources that turn a source on by themselves, for messages.
func (b *Bound) EnableFlags() []string {
	var out []string
	for _, e := range b.enables {
		if !e.absent && e.ImpliedBy == "" {
			out = append(out, "--"+e.Flag)
		}
	}
	return out
}

// flagOn reports whether the enable flag of source is on.
func (b *Bound) flagOn(source string) bool {
	for _, e := range b.enables {
		if e.source == source && !e.absent {
			return *e.on
		}
	}
	return false
}

// GuestAddrFlags returns the flags of the bound plugins that take this
// guest's address on the virtual network (see SourcePlugin.GuestAddrFlags),
// sorted.
func (b *Bound) GuestAddrFlags() []string { return slices.Sorted(slices.Values(b.guestAddr)) }

// ApplyGuestAddr sets each guest address flag that fs did not get from the
// command line to addr.
func (b *Bound) ApplyGuestAddr(fs *pflag.FlagSet, addr string) error {
	for _, name := range b.GuestAddrFlags() {
		if f := fs.Lookup(name); f != nil && !f.Changed {
			if err := f.Value.Set(addr); err != nil {
				return fmt.Errorf("--%s: %w", name, err)
			}
		}
	}
	return nil
}

// checkGuestAddr refuses a declared guest address flag the plugin does not
// define.
func checkGuestAddr(kind, name string, flags []string, fs *pflag.FlagSet) error {
	for _, f := range flags {
		if fs.Lookup(f) == nil {
			return fmt.Errorf("%s %s: guest address flag --%s is not one of its flags", kind, name, f)
		}
	}
	return nil
}

// AutoSinks returns the sinks --sinks=auto selects with o, sorted by name.
func (b *Bound) AutoSinks(o Options) []string {
	var out []string
	for _, p := range b.sinkPlugins {
		if p.Auto != nil && p.Auto(o) {
			out = append(out, p.Name)
		}
	}
	return out
}

// HostPorts reports whether the named sink exposes ports on the host (see
// SinkPlugin.HostPorts).
func (b *Bound) HostPorts(sink string) bool {
	i := slices.IndexFunc(b.sinkPlugins, func(p SinkPlugin) bool { return p.Name == sink })
	return i >= 0 && b.sinkPlugins[i].HostPorts
}
