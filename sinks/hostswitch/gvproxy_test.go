package hostswitch_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

func newSink(t *testing.T, url string, check time.Duration) *hostswitch.Sink {
	t.Helper()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: url, GuestIP: hostswitch.DefaultGuestIP, CheckInterval: check})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// forwards lists gvproxy's forwards, as "proto local -> remote".
func forwards(t *testing.T, g *gvproxytest.Gvproxy) []string {
	t.Helper()
	all, err := newSink(t, g.URL(), 0).Forwards(context.Background())
	if err != nil {
		t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	var out []string
	for _, f := range all {
		out = append(out, fmt.Sprintf("%s %s -> %s", f.Protocol, f.Local, f.Remote))
	}
	slices.Sort(out)
	return out
}

// state lists the forwards other than gvproxy's own, as "proto local".
func state(t *testing.T, g *gvproxytest.Gvproxy) []string {
	t.Helper()
	all, err := newSink(t, g.URL(), 0).Forwards(context.Background())
	if err != nil {
		t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	static := g.Static()
	var out []string
	for _, f := range all {
		if _, own := static[f.Local]; !own {
			out = append(out, f.Protocol+" "+f.Local)
		}
	}
	slices.Sort(out)
	return out
}

// staticForwards is what gvproxy's own forwards look like in forwards().
func staticForwards(g *gvproxytest.Gvproxy) []string {
	var out []string
	for local, remote := range g.Static() {
		out = append(out, fmt.Sprintf("tcp %s -> %s", local, remote))
	}
	slices.Sort(out)
	return out
}

// startRouter runs a router delivering to a host-switch sink on g until the
// returned stop is called (or the test ends).
func startRouter(t *testing.T, g *gvproxytest.Gvproxy, cfg core.RouterConfig) (*core.Router, func()) {
	t.Helper()
	r := core.NewRouter(cfg)
	r.AddSink(hostswitch.Name, newSink(t, g.URL(), 100*time.Millisecond), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = r.Run(ctx)
	}()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return r, stop
}

func loopbackPorts(id string, ports ...int) core.Mapping {
	m := core.Mapping{Key: core.Key{Source: "docker", ID: id}}
	for _, p := range ports {
		m.Ports = append(m.Ports, core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: uint16(p)})
	}
	return m
}

func tcpLocal(ports ...int) []string {
	var out []string
	for _, p := range ports {
		out = append(out, fmt.Sprintf("tcp 127.0.0.1:%d", p))
	}
	slices.Sort(out)
	return out
}

// forwardsAre is the condition, for testenv.Eventually, that gvproxy's
// forwards other than its own are exactly want ("proto local", sorted).
func forwardsAre(t *testing.T, g *gvproxytest.Gvproxy, want []string) func() (bool, string) {
	return func() (bool, string) {
		got := state(t, g)
		return slices.Equal(got, want), fmt.Sprintf("have %q", got)
	}
}

// waitForwards waits up to 30s until gvproxy's forwards other than its
// own are exactly want.
func waitForwards(t *testing.T, g *gvproxytest.Gvproxy, want []string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, fmt.Sprintf("gvproxy forwards %q", want), forwardsAre(t, g, want))
}

func TestContractAgainstGvproxy(t *testing.T) {
	g := gvproxytest.Start(t)
	sinktest.Run(t, sinktest.Harness{
		New:   func(t *testing.T) core.Sink { return newSink(t, g.URL(), 100*time.Millisecond) },
		State: func(t *testing.T) []string { return state(t, g) },
		Restart: func(t *testing.T) {
			g.Stop()
			g.Start()
		},
		Outage: func(t *testing.T, during func()) {
			// during returns once the sink has told the router that
			// gvproxy is down.
			g.Stop()
			during()
			g.Start()
		},
	})
}

// TestExposedPortListens checks that gvproxy really listens on the local
// address the sink asked for, and stops when it is removed.
func TestExposedPortListens(t *testing.T) {
	g := gvproxytest.Start(t)
	s := newSink(t, g.URL(), 0)
	port := uint16(testenv.FreePort(t))
	m := sinktest.Mapping("docker", "c1", port, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("exposed port %s does not accept connections: %v", addr, err)
	}
	c.Close()
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, addr+" to refuse connections after unexpose", func() (bool, string) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return true, ""
		}
		c.Close()
		return false, "it still accepts them"
	})
}

// TestStaticForwardsSurviveEverything starts gvproxy, like host-switch
// with Kubernetes on, with a static forward of the API port to the guest's
// same port (exactly what the agent would make for it) and its SSH
// forward. Neither may be touched: not at the agent's start, at its peer
// checks, after a gvproxy restart, after the agent is killed and
// restarted, nor at its drain; a source that wants the API port itself
// finds it held by another party.
func TestStaticForwardsSurviveEverything(t *testing.T) {
	api := testenv.FreePort(t)
	g := gvproxytest.Start(t, map[string]string{fmt.Sprintf("127.0.0.1:%d", api): fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, api)})
	p1, p2, p3 := testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)
	cfg := core.RouterConfig{StateDir: t.TempDir(), SyncGrace: 100 * time.Millisecond}
	static := staticForwards(g)
	checkStatic := func(when string) {
		t.Helper()
		got := forwards(t, g)
		for _, f := range static {
			if !slices.Contains(got, f) {
				t.Fatalf("%s: gvproxy's own forward %q is gone (have %q)", when, f, got)
			}
		}
	}

	r, stop := startRouter(t, g, cfg)
	out := r.Emitter("docker")
	out.Set(loopbackPorts("api", api)) // the API port, wanted by a source too
	out.Set(loopbackPorts("a", p1, p2))
	waitForwards(t, g, tcpLocal(p1, p2))
	checkStatic("after start")
	testenv.Eventually(t, 10*time.Second, "the API port shown as held by gvproxy", func() (bool, string) {
		for _, ps := range r.Status().Ports {
			if int(ps.HostPort) == api && len(ps.Sinks) == 1 {
				return ps.Sinks[0].State == core.PortElsewhere, ps.Sinks[0].State
			}
		}
		return false, "not in status"
	})
	// A peer check reconciles when the list changed: another party's
	// forward comes and goes, then one of this agent's goes.
	other := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	for _, change := range []func() error{
		func() error { return g.Expose("tcp", other, "192.168.127.3:80") },
		func() error { return g.Unexpose("tcp", other) },
		func() error { return g.Unexpose("tcp", fmt.Sprintf("127.0.0.1:%d", p2)) },
	} {
		syncs := sinkStatus(t, r).Syncs
		if err := change(); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 10*time.Second, "a reconcile from the peer checks", func() (bool, string) {
			got := sinkStatus(t, r).Syncs
			return got > syncs, fmt.Sprintf("%d after %d", got, syncs)
		})
	}
	waitForwards(t, g, tcpLocal(p1, p2)) // the one removed is back
	checkStatic("after peer checks")

	g.Stop()
	g.Start()
	waitForwards(t, g, tcpLocal(p1, p2))
	checkStatic("after a gvproxy restart")

	stop() // as if killed: no drain
	cfg.DrainTimeout = 5 * time.Second
	r, stop = startRouter(t, g, cfg)
	r.Emitter("docker").Snapshot([]core.Mapping{loopbackPorts("api", api), loopbackPorts("b", p3)})
	waitForwards(t, g, tcpLocal(p3))
	checkStatic("after the agent restarted")

	stop()
	waitForwards(t, g, nil)
	checkStatic("after the drain")
}

// TestBusyHostPortDelaysNothing holds one host port with another process,
// as a host program would: gvproxy answers its expose with HTTP 500. Every
// other port is exposed at once, also after a gvproxy restart; the status
// says why the busy one waits; once it frees it is exposed.
func TestBusyHostPortDelaysNothing(t *testing.T) {
	g := gvproxytest.Start(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	bp := busy.Addr().(*net.TCPAddr).Port
	p1, p2, p3 := testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)
	r, _ := startRouter(t, g, core.RouterConfig{SyncGrace: 100 * time.Millisecond})
	out := r.Emitter("docker")
	out.Set(loopbackPorts("a", p1, bp))
	out.Set(loopbackPorts("b", p2))
	waitForwards(t, g, tcpLocal(p1, p2))
	testenv.Eventually(t, 10*time.Second, "the busy port's reason in status", func() (bool, string) {
		for _, ps := range r.Status().Ports {
			if int(ps.HostPort) == bp && len(ps.Sinks) == 1 {
				at := ps.Sinks[0]
				return at.State == core.PortRetrying && strings.Contains(at.Error, "address already in use") && !at.NextRetry.IsZero(), fmt.Sprintf("%+v", at)
			}
		}
		return false, "not in status"
	})
	out.Set(loopbackPorts("c", p3))
	waitForwards(t, g, tcpLocal(p1, p2, p3))

	g.Stop()
	g.Start()
	waitForwards(t, g, tcpLocal(p1, p2, p3))

	busy.Close()
	waitForwards(t, g, tcpLocal(p1, p2, p3, bp))
}

// TestLargeRangeWithOneBlockedPort exposes a 4,000-port range (docker run
// -p A-B:A-B) of which one port is held on the host side, and frees it.
func TestLargeRangeWithOneBlockedPort(t *testing.T) {
	if testing.Short() {
		t.Skip("4,000 forwards")
	}
	g := gvproxytest.Start(t)
	const n = 4000
	base := 0
	// Find a range of free ports below the ephemeral ones (32768 and up,
	// which connections take at any moment) and away from the fault
	// suite's 20000-29999.
	for _, start := range []int{12000, 16000, 8000} {
		if base != 0 {
			break
		}
		base = start
		for p := start; p < start+n; p++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				base = 0
				break
			}
			l.Close()
		}
	}
	if base == 0 {
		t.Fatal("no free range of 4,000 ports at 8000, 12000 or 16000 on 127.0.0.1")
	}
	blocked := base + n/2
	blocker, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", blocked)) // held, as by a host process
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	ports := make([]int, n)
	for i := range ports {
		ports[i] = base + i
	}
	r, _ := startRouter(t, g, core.RouterConfig{SyncGrace: 100 * time.Millisecond})
	start := time.Now()
	r.Emitter("docker").Set(loopbackPorts("range", ports...))
	others := tcpLocal(slices.DeleteFunc(slices.Clone(ports), func(p int) bool { return p == blocked })...)
	// A functional deadline, generous for a machine busy with other tests.
	testenv.Eventually(t, 3*time.Minute, fmt.Sprintf("%d forwards", len(others)), forwardsAre(t, g, others))
	t.Logf("%d of %d ports exposed %s after the change", n-1, n, time.Since(start).Round(time.Millisecond))
	blocker.Close()
	freed := time.Now()
	testenv.Eventually(t, time.Minute, "the blocked port's forward too", forwardsAre(t, g, tcpLocal(ports...)))
	t.Logf("the blocked port was exposed %s after it freed", time.Since(freed).Round(time.Millisecond))
}
