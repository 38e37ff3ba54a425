package sockets

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

func cand(port uint16, inodes ...uint32) candidate {
	return candidate{port: core.Port{Protocol: core.TCP, ContainerPort: port, HostIP: netip.IPv4Unspecified(), HostPort: port}, inodes: inodes}
}

// TestGateHoldsBackUntilSettledAndRemovesAtOnce walks a gate with a
// settle time of 300ms through scans at the given offsets.
func TestGateHoldsBackUntilSettledAndRemovesAtOnce(t *testing.T) {
	const settle = 300 * time.Millisecond
	t0 := time.Unix(1000, 0)
	type scan struct {
		at        time.Duration
		seen      map[string]candidate
		ready     []string
		gone      []string
		transient []string
		next      time.Duration
	}
	a, b := cand(8000, 1), cand(9000, 2)
	scans := []scan{
		{at: 0, seen: map[string]candidate{"a": a}, next: settle},
		{at: 100 * time.Millisecond, seen: map[string]candidate{"a": a, "b": b}, next: 200 * time.Millisecond},
		// b lived less than the settle time: never ready.
		{at: 200 * time.Millisecond, seen: map[string]candidate{"a": a}, transient: []string{"b"}, next: 100 * time.Millisecond},
		{at: 300 * time.Millisecond, seen: map[string]candidate{"a": a}, ready: []string{"a"}},
		// Reported and still there: nothing to do.
		{at: 1300 * time.Millisecond, seen: map[string]candidate{"a": a}},
		// Gone on the first scan without it.
		{at: 2300 * time.Millisecond, seen: map[string]candidate{}, gone: []string{"a"}},
		// Back: judged afresh from the start.
		{at: 2400 * time.Millisecond, seen: map[string]candidate{"a": a}, next: settle},
		// Other sockets took the identity before it settled: the wait starts again.
		{at: 2600 * time.Millisecond, seen: map[string]candidate{"a": cand(8000, 7)}, next: settle},
		{at: 2900 * time.Millisecond, seen: map[string]candidate{"a": cand(8000, 7)}, ready: []string{"a"}},
	}
	g := newGate(settle)
	for i, s := range scans {
		ready, gone, transient, next := g.observe(t0.Add(s.at), s.seen)
		if !slices.Equal(ready, s.ready) || !slices.Equal(gone, s.gone) || !slices.Equal(transient, s.transient) || next != s.next {
			t.Fatalf("scan %d at %v: ready %v gone %v transient %v next %v; want %v %v %v %v",
				i, s.at, ready, gone, transient, next, s.ready, s.gone, s.transient, s.next)
		}
		for _, id := range ready {
			g.report(id)
		}
	}
	if got := g.reported(); len(got) != 1 || got[0].ID != "a" || got[0].Ports[0].HostPort != 8000 {
		t.Errorf("reported %v, want a on 8000", got)
	}
}

func TestGateKeepsExcludedIdentityQuiet(t *testing.T) {
	g := newGate(time.Millisecond)
	t0 := time.Unix(1000, 0)
	seen := map[string]candidate{"p": cand(8080, 5)}
	g.observe(t0, seen)
	ready, _, _, _ := g.observe(t0.Add(time.Second), seen)
	if !slices.Equal(ready, []string{"p"}) {
		t.Fatalf("ready %v", ready)
	}
	g.exclude("p")
	for i := 2; i < 5; i++ {
		if ready, gone, transient, next := g.observe(t0.Add(time.Duration(i)*time.Second), seen); len(ready)+len(gone)+len(transient) != 0 || next != 0 {
			t.Fatalf("an excluded identity came back: %v %v %v %v", ready, gone, transient, next)
		}
	}
	if ready, gone, transient, _ := g.observe(t0.Add(10*time.Second), nil); len(ready)+len(gone)+len(transient) != 0 {
		t.Fatalf("an excluded identity's removal was reported: %v %v %v", ready, gone, transient)
	}
	if len(g.reported()) != 0 {
		t.Fatal("an excluded identity was reported")
	}
}

func TestSocketInode(t *testing.T) {
	tests := []struct {
		link string
		ino  uint32
		ok   bool
	}{
		{"socket:[346230]", 346230, true},
		{"socket:[4294967295]", 4294967295, true},
		{"socket:[4294967296]", 0, false},
		{"socket:[]", 0, false},
		{"socket:[12", 0, false},
		{"pipe:[12]", 0, false},
		{"/dev/null", 0, false},
		{"anon_inode:[eventpoll]", 0, false},
	}
	for _, tt := range tests {
		ino, ok := socketInode([]byte(tt.link))
		if ino != tt.ino || ok != tt.ok {
			t.Errorf("socketInode(%q) = %d, %v; want %d, %v", tt.link, ino, ok, tt.ino, tt.ok)
		}
	}
}

// sourceFromFlags builds the source as the agent does: the registration's
// flags parsed from args, and env's options.
func sourceFromFlags(t *testing.T, opts registry.Options, args ...string) *Source {
	t.Helper()
	for _, p := range registry.Default.Sources() {
		if p.Name != Name {
			continue
		}
		fs := pflag.NewFlagSet(Name, pflag.ContinueOnError)
		factory := p.Setup(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		src, err := factory(registry.Env{Options: opts})
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		return src.(*Source)
	}
	t.Fatalf("source %q is not registered", Name)
	return nil
}

// TestRelayRunsInTunnelModeOrWhereTheAddressIsGiven checks when the
// registration turns the relay on: in network-tunnel mode at the default
// address, and in any mode at an address given on the command line, which
// may also be empty to turn it off.
func TestRelayRunsInTunnelModeOrWhereTheAddressIsGiven(t *testing.T) {
	tests := []struct {
		name string
		mode core.Mode
		args []string
		want string // "" for no relay
	}{
		{"localhost mode, default address", core.ModeLocal, nil, ""},
		{"privileged mode, default address", core.ModePrivileged, nil, ""},
		{"tunnel mode, default address", core.ModeTunnel, nil, DefaultRelayAddr},
		{"localhost mode, address given", core.ModeLocal, []string{"--socketsRelayAddr=198.18.0.7"}, "198.18.0.7"},
		{"localhost mode, the default address given", core.ModeLocal, []string{"--socketsRelayAddr=" + DefaultRelayAddr}, DefaultRelayAddr},
		{"tunnel mode, address given", core.ModeTunnel, []string{"--socketsRelayAddr=198.18.0.7"}, "198.18.0.7"},
		{"tunnel mode, empty address given", core.ModeTunnel, []string{"--socketsRelayAddr="}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := sourceFromFlags(t, registry.Options{Mode: tt.mode}, tt.args...)
			got := ""
			if len(s.relayAt) > 0 {
				got = s.relayAt[0].addr.String()
			}
			if got != tt.want {
				t.Errorf("relay address %q, want %q", got, tt.want)
			}
		})
	}
}

// TestKubernetesAPIPortIsExcluded checks that the Kubernetes API port is
// added to the excluded ports, the flag's and the defaults alike.
func TestKubernetesAPIPortIsExcluded(t *testing.T) {
	for _, tt := range []struct {
		name     string
		args     []string
		excluded []uint16
		reported []uint16
	}{
		{"default exclusions", nil, []uint16{22, 6443, 16443}, []uint16{8080}},
		{"exclusions given", []string{"--socketsExclude=8080"}, []uint16{8080, 16443}, []uint16{22}},
		{"no exclusions given", []string{"--socketsExclude="}, []uint16{16443}, []uint16{22, 8080}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := sourceFromFlags(t, registry.Options{K8sAPIPort: 16443}, tt.args...)
			for _, p := range tt.excluded {
				if !excluded(s.exclude, p) {
					t.Errorf("port %d is not excluded (%v)", p, s.exclude)
				}
			}
			for _, p := range tt.reported {
				if excluded(s.exclude, p) {
					t.Errorf("port %d is excluded (%v)", p, s.exclude)
				}
			}
		})
	}
	s := sourceFromFlags(t, registry.Options{})
	if excluded(s.exclude, 16443) {
		t.Errorf("without a Kubernetes API port, 16443 is excluded (%v)", s.exclude)
	}
	if DefaultExclude[len(DefaultExclude)-1] == "16443" {
		t.Error("DefaultExclude was appended to")
	}
}

// TestNewAppliesTheRelayAndKubernetesFields checks the same rules on
// Config directly: RelayAddr alone relays in any mode, and
// RelayInTunnelModeOnly limits it to network-tunnel mode.
func TestNewAppliesTheRelayAndKubernetesFields(t *testing.T) {
	const addr = "198.18.0.9"
	for _, tt := range []struct {
		cfg  Config
		want bool
	}{
		{Config{RelayAddr: addr}, true},
		{Config{RelayAddr: addr, RelayInTunnelModeOnly: true}, false},
		{Config{RelayAddr: addr, RelayInTunnelModeOnly: true, Mode: core.ModeTunnel}, true},
		{Config{Mode: core.ModeTunnel}, false},
	} {
		s, err := New(tt.cfg)
		if err != nil {
			t.Fatal(err)
		}
		if (len(s.relayAt) > 0) != tt.want {
			t.Errorf("New(%+v): relay at %v, want a relay: %v", tt.cfg, s.relayAt, tt.want)
		}
	}
	s, err := New(Config{KubernetesAPIPort: 7443, Exclude: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	if !excluded(s.exclude, 7443) || excluded(s.exclude, 22) {
		t.Errorf("exclusions %v, want 7443 alone", s.exclude)
	}
}
