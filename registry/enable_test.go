package registry_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// source returns a source plugin named name with e as its enable flag and
// one flag of its own, nameAddr, declared as a guest address flag.
func source(name string, e *registry.Enable) registry.SourcePlugin {
	return registry.SourcePlugin{
		Name:           name,
		Enable:         e,
		GuestAddrFlags: []string{name + "Addr"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			fs.String(name+"Addr", "192.168.127.2", "the guest's address")
			return func(registry.Env) (core.Source, error) { return nopSource{}, nil }
		},
	}
}

// enableRegistry holds a source off by default ("one"), one on by default
// in network-tunnel mode ("tunnel") and one implied by "one" ("follower").
func enableRegistry() *registry.Registry {
	r := registry.New()
	r.RegisterSource(source("one", &registry.Enable{Flag: "one", Usage: "turn one on", K8sAPI: true}))
	r.RegisterSource(source("tunnel", &registry.Enable{Flag: "tunnel", Usage: "turn tunnel on", Modes: []core.Mode{core.ModeTunnel}}))
	r.RegisterSource(source("follower", &registry.Enable{Flag: "follower", Usage: "with --one", ImpliedBy: "one"}))
	r.RegisterSource(source("byname", nil))
	return r
}

func TestEnabledSourcesFollowTheDeclarations(t *testing.T) {
	for _, tt := range []struct {
		mode core.Mode
		args []string
		want []string
		k8s  bool
	}{
		{core.ModeLocal, nil, nil, false},
		{core.ModeTunnel, nil, []string{"tunnel"}, false},
		{core.ModeTunnel, []string{"--tunnel=false"}, nil, false},
		{core.ModeLocal, []string{"--tunnel"}, []string{"tunnel"}, false},
		{core.ModeLocal, []string{"--one"}, []string{"follower", "one"}, true},
		{core.ModeLocal, []string{"--one", "--follower=false"}, []string{"one"}, true},
		{core.ModeLocal, []string{"--follower"}, nil, false}, // alone it turns nothing on
	} {
		fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
		b, err := enableRegistry().Bind(fs)
		if err != nil {
			t.Fatal(err)
		}
		if err := fs.Parse(tt.args); err != nil {
			t.Fatal(err)
		}
		got := b.EnabledSources(tt.mode, fs.Changed)
		if !slices.Equal(got, tt.want) {
			t.Errorf("%v %v: sources %v, want %v", tt.mode, tt.args, got, tt.want)
		}
		if b.K8sAPI() != tt.k8s {
			t.Errorf("%v %v: K8sAPI() = %v, want %v", tt.mode, tt.args, b.K8sAPI(), tt.k8s)
		}
	}
}

func TestEnableFlagsAreDefinedAndListed(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	b, err := enableRegistry().Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	for flag, def := range map[string]string{"one": "false", "tunnel": "false", "follower": "true"} {
		f := fs.Lookup(flag)
		if f == nil || b.Enabling.Lookup(flag) != f || f.DefValue != def {
			t.Errorf("--%s: %+v, want it on the flag set and Enabling, default %s", flag, f, def)
		}
	}
	if fs.Lookup("byname") != nil {
		t.Error("a source without Enable got an enable flag")
	}
	if got := b.EnableFlags(); !slices.Equal(got, []string{"--one", "--tunnel"}) {
		t.Errorf("EnableFlags() = %v, want the flags that turn a source on by themselves", got)
	}
}

func TestRancherDesktopFlagOfALeftOutSource(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	b, err := enableRegistry().Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse([]string{"--sockets=false", "--docker"}); err != nil {
		t.Fatalf("Rancher Desktop's flags of left-out sources: %v", err)
	}
	got := b.EnabledSources(core.ModeTunnel, fs.Changed)
	if !slices.Contains(got, "docker") || slices.Contains(got, "sockets") {
		t.Fatalf("sources %v, want docker (asked for) and not sockets", got)
	}
	if _, err := b.NewSource("docker", registry.Env{}); err == nil || !strings.Contains(err.Error(), `no source named "docker" in this build`) {
		t.Errorf("building the left-out source: %v", err)
	}
}

func TestDuplicateEnableFlagPanics(t *testing.T) {
	for name, p := range map[string]registry.SourcePlugin{
		"taken":                  source("other", &registry.Enable{Flag: "one"}),
		"no name":                source("other", &registry.Enable{}),
		"Rancher Desktop's flag": source("other", &registry.Enable{Flag: "docker"}),
	} {
		t.Run(name, func(t *testing.T) {
			r := enableRegistry()
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			r.RegisterSource(p)
		})
	}
}

func TestUnknownImpliedSourceIsRefused(t *testing.T) {
	r := enableRegistry()
	r.RegisterSource(source("orphan", &registry.Enable{Flag: "orphan", ImpliedBy: "nosuch"}))
	_, err := r.Bind(pflag.NewFlagSet("x", pflag.ContinueOnError))
	if err == nil || !strings.Contains(err.Error(), "orphan") || !strings.Contains(err.Error(), `"nosuch"`) {
		t.Errorf("err = %v, want one naming the source and the unknown one implying it", err)
	}
	r = enableRegistry()
	r.RegisterSource(source("orphan", &registry.Enable{Flag: "orphan", ImpliedBy: "byname"}))
	if _, err := r.Bind(pflag.NewFlagSet("x", pflag.ContinueOnError)); err == nil || !strings.Contains(err.Error(), `"byname"`) {
		t.Errorf("implied by a source without an enable flag: %v", err)
	}
}

func TestGuestAddrFlags(t *testing.T) {
	r := enableRegistry()
	r.RegisterSink(registry.SinkPlugin{
		Name: "peer", GuestAddrFlags: []string{"peerGuestIP"},
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			fs.String("peerGuestIP", "192.168.127.2", "the guest's address")
			return nil
		},
	})
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	b, err := r.Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"bynameAddr", "followerAddr", "oneAddr", "peerGuestIP", "tunnelAddr"}
	if got := b.GuestAddrFlags(); !slices.Equal(got, want) {
		t.Errorf("GuestAddrFlags() = %v, want %v", got, want)
	}
	if err := fs.Parse([]string{"--oneAddr=10.0.0.7"}); err != nil {
		t.Fatal(err)
	}
	if err := b.ApplyGuestAddr(fs, "10.0.0.9"); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"oneAddr": "10.0.0.7", "tunnelAddr": "10.0.0.9", "peerGuestIP": "10.0.0.9"} {
		if got := fs.Lookup(name).Value.String(); got != want {
			t.Errorf("--%s = %s, want %s", name, got, want)
		}
	}

	r = registry.New()
	r.RegisterSource(registry.SourcePlugin{Name: "liar", GuestAddrFlags: []string{"nosuchFlag"},
		Setup: func(*pflag.FlagSet) registry.SourceFactory { return nil }})
	if _, err := r.Bind(pflag.NewFlagSet("x", pflag.ContinueOnError)); err == nil || !strings.Contains(err.Error(), "--nosuchFlag") {
		t.Errorf("a guest address flag the plugin lacks: %v", err)
	}
}

func TestAutoSinksAndHostPorts(t *testing.T) {
	r := registry.New()
	setup := func(*pflag.FlagSet) registry.SinkFactory { return nil }
	r.RegisterSink(registry.SinkPlugin{Name: "host", Setup: setup, HostPorts: true,
		Auto: func(o registry.Options) bool { return o.Mode != core.ModePrivileged }})
	r.RegisterSink(registry.SinkPlugin{Name: "wsl", Setup: setup,
		Auto: func(o registry.Options) bool { return o.WSLIntegration }})
	r.RegisterSink(registry.SinkPlugin{Name: "debug", Setup: setup})
	b, err := r.Bind(pflag.NewFlagSet("x", pflag.ContinueOnError))
	if err != nil {
		t.Fatal(err)
	}
	if got := b.AutoSinks(registry.Options{Mode: core.ModeLocal, WSLIntegration: true}); !slices.Equal(got, []string{"host", "wsl"}) {
		t.Errorf("local with WSL: %v", got)
	}
	if got := b.AutoSinks(registry.Options{Mode: core.ModePrivileged}); len(got) != 0 {
		t.Errorf("privileged without WSL: %v, want none", got)
	}
	if !b.HostPorts("host") || b.HostPorts("wsl") || b.HostPorts("nosuch") {
		t.Error("HostPorts does not follow the declarations")
	}
}
