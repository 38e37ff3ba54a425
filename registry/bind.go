package registry

import (
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
)

// Group is one plugin's flags, for grouped --help output.
type Group struct {
	Kind    string // "source" or "sink"
	Name    string
	Summary string
	Flags   *pflag.FlagSet
}

// Bound holds every registered plugin with its flags defined on one flag
// set, ready to build the plugins a command line selects.
type Bound struct {
	Groups []Group
	// Enabling holds the sources' Rancher Desktop-compatible enable flags
	// (see Enable), also defined on the bound flag set.
	Enabling    *pflag.FlagSet
	sources     map[string]SourceFactory
	sinks       map[string]SinkFactory
	sinkPlugins []SinkPlugin
	enables     []*enabler
	guestAddr   []string
}

// Bind defines the flags of every plugin in r on fs and returns the
// plugins' factories, and the sources' enable flags. Each call gets fresh
// flag variables, so tests can bind several flag sets independently. It
// refuses a flag name taken twice, a declared guest address flag the
// plugin lacks, and an enable flag implied by a source that has none.
func (r *Registry) Bind(fs *pflag.FlagSet) (*Bound, error) {
	b := &Bound{sources: map[string]SourceFactory{}, sinks: map[string]SinkFactory{}}
	sources := r.Sources()
	for _, p := range sources {
		g := Group{Kind: "source", Name: p.Name, Summary: p.Summary, Flags: pflag.NewFlagSet(p.Name, pflag.ContinueOnError)}
		b.sources[p.Name] = p.Setup(g.Flags)
		if err := checkGuestAddr(g.Kind, p.Name, p.GuestAddrFlags, g.Flags); err != nil {
			return nil, err
		}
		if err := merge(fs, g); err != nil {
			return nil, err
		}
		b.Groups = append(b.Groups, g)
		b.guestAddr = append(b.guestAddr, p.GuestAddrFlags...)
	}
	for _, p := range r.Sinks() {
		g := Group{Kind: "sink", Name: p.Name, Summary: p.Summary, Flags: pflag.NewFlagSet(p.Name, pflag.ContinueOnError)}
		b.sinks[p.Name] = p.Setup(g.Flags)
		if err := checkGuestAddr(g.Kind, p.Name, p.GuestAddrFlags, g.Flags); err != nil {
			return nil, err
		}
		if err := merge(fs, g); err != nil {
			return nil, err
		}
		b.Groups = append(b.Groups, g)
		b.guestAddr = append(b.guestAddr, p.GuestAddrFlags...)
		b.sinkPlugins = append(b.sinkPlugins, p)
	}
	if err := b.bindEnables(sources); err != nil {
		return nil, err
	}
	if err := merge(fs, Group{Kind: "source", Name: "enable flags", Flags: b.Enabling}); err != nil {
		return nil, err
	}
	return b, nil
}

// merge adds g's flags to fs, refusing a name that is already taken.
func merge(fs *pflag.FlagSet, g Group) error {
	var err error
	g.Flags.VisitAll(func(f *pflag.Flag) {
		if err == nil && fs.Lookup(f.Name) != nil {
			err = fmt.Errorf("flag --%s of %s %s is already defined", f.Name, g.Kind, g.Name)
		}
	})
	if err != nil {
		return err
	}
	fs.AddFlagSet(g.Flags)
	return nil
}

// SourceNames returns the names of the bound source plugins, sorted.
func (b *Bound) SourceNames() []string { return keys(b.sources) }

// SinkNames returns the names of the bound sink plugins, sorted.
func (b *Bound) SinkNames() []string { return keys(b.sinks) }

func keys[T any](m map[string]T) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// NewSource builds the named source.
func (b *Bound) NewSource(name string, env Env) (core.Source, error) {
	f, ok := b.sources[name]
	if !ok {
		return nil, fmt.Errorf("no source named %q in this build (have: %s)", name, strings.Join(b.SourceNames(), ", "))
	}
	s, err := f(env)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w", name, err)
	}
	return s, nil
}

// NewSink builds the named sink.
func (b *Bound) NewSink(name string, env Env) (core.Sink, error) {
	f, ok := b.sinks[name]
	if !ok {
		return nil, fmt.Errorf("no sink named %q in this build (have: %s)", name, strings.Join(b.SinkNames(), ", "))
	}
	s, err := f(env)
	if err != nil {
		return nil, fmt.Errorf("sink %s: %w", name, err)
	}
	return s, nil
}
