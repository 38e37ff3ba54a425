package core_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

// fakePeer is an in-memory peer, as strict as the real ones: it keys ports
// as its keying says (a remove closes whatever holds the key), refuses an
// add of a key held at another address, and counts every removal of an
// entry another party made as a violation.
type fakePeer struct {
	keying core.PeerKeying

	mu         sync.Mutex
	held       map[string]heldEntry // by peer key
	log        []core.Change
	violations []string
	down       bool          // every call fails with PeerDown
	failN      int           // the next failN sends fail (transient)
	busy       uint16        // adds of this host port fail (transient) while set
	reject     uint16        // adds of this host port fail permanently
	block      chan struct{} // when set, Send waits for it to close
	sends      atomic.Int64
}

type heldEntry struct {
	port    core.Port
	foreign bool
	target  string // for foreign entries: "guest" matches what the agent would make
}

func newFakePeer() *fakePeer { return &fakePeer{held: map[string]heldEntry{}} }

func entry(p core.Port) string {
	ip := p.HostIP
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return fmt.Sprintf("%s %s", p.Protocol, netip.AddrPortFrom(ip, p.HostPort))
}

func (f *fakePeer) key(p core.Port) string {
	if f.keying == core.ByPort {
		return fmt.Sprintf("%s %d", p.Protocol, p.HostPort)
	}
	return entry(p)
}

func (f *fakePeer) PeerKeying() core.PeerKeying { return f.keying }

func (f *fakePeer) Send(ctx context.Context, c core.Change) error {
	f.sends.Add(1)
	f.mu.Lock()
	block := f.block
	f.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return core.PeerDown(errors.New("connection refused"))
	}
	if f.failN > 0 {
		f.failN--
		return errors.New("HTTP 500")
	}
	if len(c.Mapping.Ports) != 1 {
		f.violations = append(f.violations, fmt.Sprintf("change with %d ports: %v", len(c.Mapping.Ports), c))
	}
	for _, p := range c.Mapping.Ports {
		k := f.key(p)
		e, ok := f.held[k]
		if c.Remove {
			if ok && e.foreign {
				f.violations = append(f.violations, "removed another party's "+entry(e.port))
			}
			delete(f.held, k)
			continue
		}
		switch {
		case p.HostPort == f.reject:
			return core.Permanent(fmt.Errorf("cannot expose %v", p))
		case p.HostPort == f.busy:
			return fmt.Errorf("listen %s: address already in use", entry(p))
		case ok && e.foreign && e.target == "guest":
			return core.HeldElsewhere(fmt.Errorf("%s already forwarded", entry(p)))
		case ok && e.foreign:
			return core.Conflict(fmt.Errorf("%s already forwarded to %s", entry(p), e.target))
		case ok && entry(e.port) != entry(p):
			f.violations = append(f.violations, fmt.Sprintf("add of %s while %s holds the port", entry(p), entry(e.port)))
			return fmt.Errorf("port %d already listening", p.HostPort)
		}
		f.held[k] = heldEntry{port: p}
	}
	f.log = append(f.log, c)
	return nil
}

// state is what the peer holds, as "proto ip:port", foreign entries too.
func (f *fakePeer) state() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, e := range f.held {
		out = append(out, entry(e.port))
	}
	slices.Sort(out)
	return out
}

func (f *fakePeer) set(fn func(*fakePeer)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakePeer) changes() []core.Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.log)
}

func (f *fakePeer) checkNoViolations(t *testing.T) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.violations {
		t.Error("peer: " + v)
	}
}

// hold adds an entry another party made.
func (f *fakePeer) hold(p core.Port, target string) {
	f.set(func(f *fakePeer) { f.held[f.key(p)] = heldEntry{port: p, foreign: true, target: target} })
}

// listPeer adds List to fakePeer.
type listPeer struct {
	*fakePeer
	lists atomic.Int64
}

func (l *listPeer) List(context.Context) ([]core.Held, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		return nil, core.PeerDown(errors.New("connection refused"))
	}
	l.lists.Add(1)
	var out []core.Held
	for _, e := range l.held {
		out = append(out, core.Held{Port: e.port, Target: e.target, Matches: !e.foreign || e.target == "guest"})
	}
	return out, nil
}

// watchPeer adds WatchPeer to fakePeer: a value on check triggers a report.
type watchPeer struct {
	*fakePeer
	check chan struct{}
}

func (w *watchPeer) WatchPeer(ctx context.Context, check func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.check:
			check()
		}
	}
}

// listWatchPeer is a listPeer with WatchPeer.
type listWatchPeer struct {
	*listPeer
	check chan struct{}
}

func (w *listWatchPeer) WatchPeer(ctx context.Context, check func()) {
	(&watchPeer{check: w.check}).WatchPeer(ctx, check)
}

// ipv4Peer adds a PortFilter that refuses IPv6 addresses.
type ipv4Peer struct{ *fakePeer }

func (ipv4Peer) Supports(p core.Port) error {
	if p.HostIP.Is6() {
		return fmt.Errorf("%s: IPv4 only", p)
	}
	return nil
}

var lo = netip.MustParseAddr("127.0.0.1")

func mapping(id string, ports ...uint16) core.Mapping {
	m := core.Mapping{Key: core.Key{ID: id}}
	for _, p := range ports {
		m.Ports = append(m.Ports, core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: lo, HostPort: p})
	}
	return m
}

func tcp(ip string, port uint16) core.Port {
	return core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.MustParseAddr(ip), HostPort: port}
}

// want returns the peer state the ports of ms make.
func want(ms ...core.Mapping) []string {
	var out []string
	for _, m := range ms {
		for _, p := range m.Ports {
			out = append(out, entry(p))
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// waitFor bounds every wait of these tests for the router to catch up.
const waitFor = 10 * time.Second

func waitState(t *testing.T, p *fakePeer, w []string) {
	t.Helper()
	testenv.Eventually(t, waitFor, fmt.Sprintf("peer state %q", w), func() (bool, string) {
		got := p.state()
		return slices.Equal(got, w), fmt.Sprintf("have %q", got)
	})
}

type harness struct {
	r      *core.Router
	cancel context.CancelFunc
	done   chan struct{}
}

func fastConfig() core.RouterConfig {
	return core.RouterConfig{
		Backoff:     core.Backoff{Initial: 5 * time.Millisecond, Max: 20 * time.Millisecond},
		PortBackoff: core.Backoff{Initial: 5 * time.Millisecond, Max: 20 * time.Millisecond},
		SyncGrace:   20 * time.Millisecond,
	}
}

func startRouter(t *testing.T, cfg core.RouterConfig, setup func(r *core.Router)) *harness {
	t.Helper()
	r := core.NewRouter(cfg)
	setup(r)
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{r: r, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		if err := r.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.cancel()
	<-h.done
}

// portAt returns the status of addr at sink.
func portAt(st core.Status, addr core.Port, sink string) (core.PortStatus, core.PortAtSink, bool) {
	for _, ps := range st.Ports {
		if ps.Protocol == addr.Protocol && ps.HostIP == addr.HostIP && ps.HostPort == addr.HostPort {
			for _, s := range ps.Sinks {
				if s.Sink == sink {
					return ps, s, true
				}
			}
			return ps, core.PortAtSink{}, false
		}
	}
	return core.PortStatus{}, core.PortAtSink{}, false
}

func waitPortState(t *testing.T, h *harness, addr core.Port, sink, state string) core.PortAtSink {
	t.Helper()
	var at core.PortAtSink
	testenv.Eventually(t, waitFor, fmt.Sprintf("%s at %s to be %s", entry(addr), sink, state), func() (bool, string) {
		_, at, _ = portAt(h.r.Status(), addr, sink)
		return at.State == state, fmt.Sprintf("it is %q", at.State)
	})
	return at
}

func TestAddUpdateRemove(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")

	out.Set(mapping("a", 8080, 8081))
	waitState(t, p, want(mapping("a", 8080, 8081)))

	out.Set(mapping("a", 8081, 8082))
	waitState(t, p, want(mapping("a", 8081, 8082)))
	log := p.changes()
	if len(log) != 4 || !log[2].Remove || log[3].Remove {
		t.Fatalf("update should send remove(went) then add(came), one port each; got %v", log)
	}
	if got := log[2].Mapping.Ports; got[0].HostPort != 8080 {
		t.Errorf("remove should carry the port that went, got %v", got)
	}
	if got := log[3].Mapping.Ports; got[0].HostPort != 8082 {
		t.Errorf("add should carry the port that came, got %v", got)
	}

	out.Set(mapping("a", 8082, 8081)) // same ports, other order: no change
	out.Delete("unknown")             // nothing to do
	out.Set(mapping("b", 9000))
	waitState(t, p, want(mapping("a", 8081, 8082), mapping("b", 9000)))
	if n := len(p.changes()); n != 5 {
		t.Errorf("duplicate set or unknown delete produced changes: %v", p.changes()[4:])
	}
	out.Delete("a")
	waitState(t, p, want(mapping("b", 9000)))
	out.Set(mapping("b")) // no ports left is a removal
	waitState(t, p, nil)
	p.checkNoViolations(t)
}

func TestConnectAddrChangeReplacesPorts(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	m := mapping("a", 8080)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	out.Set(m)
	waitState(t, p, want(m))
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.3:80"}}
	out.Set(m)
	testenv.Eventually(t, waitFor, "remove and re-add", func() (bool, string) {
		log := p.changes()
		return len(log) == 3, fmt.Sprintf("changes %v", log)
	})
	log := p.changes()
	if !log[1].Remove || log[1].Mapping.ConnectAddrs[0].Addr != "198.18.0.2:80" || log[2].Mapping.ConnectAddrs[0].Addr != "198.18.0.3:80" {
		t.Errorf("backend change should remove with the old address and add with the new: %v", log)
	}
}

func TestSnapshotReplacesOnlyItsSource(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	one, two := h.r.Emitter("one"), h.r.Emitter("two")
	one.Set(mapping("a", 8080))
	one.Set(mapping("b", 8081))
	two.Set(mapping("a", 9090))
	waitState(t, p, want(mapping("a", 8080), mapping("b", 8081), mapping("a", 9090)))
	one.Snapshot([]core.Mapping{mapping("b", 8081), mapping("c", 8082)})
	waitState(t, p, want(mapping("b", 8081), mapping("c", 8082), mapping("a", 9090)))
}

func TestSharedPortStaysUntilLastClaimGoes(t *testing.T) {
	for _, keying := range []core.PeerKeying{core.ByAddress, core.ByPort} {
		t.Run(fmt.Sprint("keying ", keying), func(t *testing.T) {
			p := newFakePeer()
			p.keying = keying
			h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
			k8s, nat := h.r.Emitter("kubernetes"), h.r.Emitter("iptables")
			k8s.Set(mapping("svc-uid", 30080))
			nat.Set(mapping("tcp/30080", 30080))
			waitState(t, p, want(mapping("x", 30080)))
			k8s.Delete("svc-uid")
			nat.Set(mapping("tcp/30081", 30081)) // a later change, to know the delete was processed
			waitState(t, p, want(mapping("x", 30080, 30081)))
			for _, c := range p.changes() {
				if c.Remove {
					t.Errorf("a port another claim still wants was removed: %v", c)
				}
			}
			nat.Delete("tcp/30080")
			waitState(t, p, want(mapping("x", 30081)))
			p.checkNoViolations(t)
		})
	}
}

// A peer that keys by port alone gets one address per port: a second
// claim on another address of the same port is not sent, and when the
// first goes the port moves to the second's address.
func TestByPortPeerGetsOneAddressPerPort(t *testing.T) {
	p := newFakePeer()
	p.keying = core.ByPort
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	local := core.Mapping{Key: core.Key{ID: "local"}, Ports: []core.Port{tcp("127.0.0.1", 8080)}}
	all := core.Mapping{Key: core.Key{ID: "all"}, Ports: []core.Port{tcp("0.0.0.0", 8080)}}
	h.r.Emitter("containerd").Set(local)
	waitState(t, p, want(local))
	h.r.Emitter("docker").Set(all)
	h.r.Emitter("docker").Set(mapping("probe", 9000))
	waitState(t, p, want(local, mapping("probe", 9000)))
	h.r.Emitter("containerd").Delete("local")
	waitState(t, p, want(all, mapping("probe", 9000)))
	h.r.Emitter("docker").Delete("all")
	waitState(t, p, want(mapping("probe", 9000)))
	p.checkNoViolations(t)
}

func TestConflictingClaimWaitsForTheFirst(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	first, second := mapping("first", 8080), mapping("second", 8080)
	first.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	second.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.3:80"}}
	h.r.Emitter("static").Set(first)
	waitState(t, p, want(first))
	h.r.Emitter("static").Set(second)
	var ps core.PortStatus
	testenv.Eventually(t, waitFor, "the conflict in status", func() (bool, string) {
		ps, _, _ = portAt(h.r.Status(), first.Ports[0], "p")
		return len(ps.Claims) == 2, fmt.Sprintf("claims %+v", ps.Claims)
	})
	if ps.Claims[0].Key.ID != "first" || ps.Claims[0].Conflict != "" || ps.Claims[1].Conflict == "" {
		t.Errorf("claims = %+v, want first holding and second in conflict", ps.Claims)
	}
	h.r.Emitter("static").Delete("first")
	testenv.Eventually(t, waitFor, "the second claim to take over", func() (bool, string) {
		log := p.changes()
		last := log[len(log)-1]
		return !last.Remove && last.Mapping.ID == "second" && last.Mapping.ConnectAddrs[0].Addr == "198.18.0.3:80",
			fmt.Sprintf("the last change is %v", last)
	})
	waitState(t, p, want(second))
}

func TestSlowSinkBlocksNothing(t *testing.T) {
	slow, fast := newFakePeer(), newFakePeer()
	release := make(chan struct{})
	slow.block = release
	h := startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("slow", slow, nil)
		r.AddSink("fast", fast, nil)
	})
	out := h.r.Emitter("src")
	emitted := make(chan struct{})
	go func() {
		defer close(emitted)
		for i := range 500 {
			out.Set(mapping(fmt.Sprint(i), uint16(20000+i)))
		}
		for i := range 250 {
			out.Delete(fmt.Sprint(i))
		}
	}()
	select {
	case <-emitted:
	case <-time.After(waitFor):
		t.Fatal("the source was blocked by a stuck sink")
	}
	var w []core.Mapping
	for i := 250; i < 500; i++ {
		w = append(w, mapping(fmt.Sprint(i), uint16(20000+i)))
	}
	waitState(t, fast, want(w...))
	close(release)
	waitState(t, slow, want(w...))
	// The stuck sink's queue coalesced: it never exposed the ports that went
	// while it was stuck, apart from the one it was holding.
	if n := slow.sends.Load(); n > 252 {
		t.Errorf("slow sink got %d sends for 250 surviving ports; queue did not coalesce", n)
	}
}

func TestRetryAfterTransientFailure(t *testing.T) {
	p := newFakePeer()
	p.failN = 3
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080))
	waitState(t, p, want(mapping("a", 8080)))
	st := h.r.Status().Sinks[0]
	if st.Failures != 3 || st.Delivered != 1 || st.LastError == "" {
		t.Errorf("status = %+v, want 3 failures, 1 delivery and the last error", st)
	}
}

// One port the peer cannot bind is retried on its own: it delays no other
// port of the same mapping or of others, and is exposed once it frees.
func TestBusyPortDelaysNoOtherPort(t *testing.T) {
	p := &listWatchPeer{listPeer: &listPeer{fakePeer: newFakePeer()}, check: make(chan struct{})}
	p.busy = 2223
	cfg := fastConfig()
	cfg.PortBackoff = core.Backoff{Initial: time.Hour, Max: time.Hour} // a retry would never come in time
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("docker")
	out.Set(mapping("a", 2222, 2223, 2224))
	out.Set(mapping("b", 9000))
	waitState(t, p.fakePeer, want(mapping("x", 2222, 2224, 9000)))
	at := waitPortState(t, h, tcp("127.0.0.1", 2223), "p", core.PortRetrying)
	if at.Error == "" || at.NextRetry.IsZero() {
		t.Errorf("status of the busy port = %+v, want the peer's error and the next retry", at)
	}
	// Later changes are not held up either.
	out.Set(mapping("c", 9001))
	waitState(t, p.fakePeer, want(mapping("x", 2222, 2224, 9000, 9001)))
	// The peer restarts empty: a reconcile restores every other port.
	p.set(func(f *fakePeer) { clear(f.held) })
	p.check <- struct{}{}
	waitState(t, p.fakePeer, want(mapping("x", 2222, 2224, 9000, 9001)))
	// A change of the port's claim tries it again at once.
	p.set(func(f *fakePeer) { f.busy = 0 })
	m := mapping("a", 2222, 2223, 2224)
	m.Ports[1].ContainerPort = 81
	out.Set(m)
	waitState(t, p.fakePeer, want(mapping("x", 2222, 2223, 2224, 9000, 9001)))
	p.checkNoViolations(t)
}

func TestBusyPortIsRetriedOnItsOwnBackoff(t *testing.T) {
	p := newFakePeer()
	p.busy = 8081
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080, 8081))
	waitState(t, p, want(mapping("a", 8080)))
	testenv.Eventually(t, waitFor, "a few retries", func() (bool, string) {
		n := h.r.Status().Sinks[0].Failures
		return n >= 3, fmt.Sprintf("%d failures", n)
	})
	p.set(func(f *fakePeer) { f.busy = 0 })
	waitState(t, p, want(mapping("a", 8080, 8081)))
	waitPortState(t, h, tcp("127.0.0.1", 8081), "p", core.PortExposed)
}

func TestReplayAfterPeerDown(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	out.Set(mapping("a", 8080))
	out.Set(mapping("b", 8081))
	waitState(t, p, want(mapping("a", 8080), mapping("b", 8081)))

	// The peer goes down and comes back empty (it restarted).
	p.set(func(f *fakePeer) { f.down = true })
	out.Set(mapping("c", 8082))
	out.Delete("b")
	testenv.Eventually(t, waitFor, "a failed delivery", func() (bool, string) {
		return h.r.Status().Sinks[0].PeerDown, "the sink is not down"
	})
	p.set(func(f *fakePeer) { f.down = false; clear(f.held) })
	waitState(t, p, want(mapping("a", 8080), mapping("c", 8082)))
}

func TestListerReconcilesAfterPeerDown(t *testing.T) {
	p := &listPeer{fakePeer: newFakePeer()}
	h := startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("p", p, nil)
		r.AddSource("src", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			<-ctx.Done()
			return nil
		}))
	})
	waitState(t, p.fakePeer, want(mapping("a", 8080)))
	p.set(func(f *fakePeer) { f.down = true })
	h.r.Emitter("src").Set(mapping("b", 8081))
	testenv.Eventually(t, waitFor, "a failed delivery", func() (bool, string) {
		return h.r.Status().Sinks[0].PeerDown, "the sink is not down"
	})
	p.set(func(f *fakePeer) { f.down = false; clear(f.held) })
	waitState(t, p.fakePeer, want(mapping("a", 8080), mapping("b", 8081)))
	p.checkNoViolations(t)
}

// Forwards the agent did not create are never removed: not at start, not
// at a reconcile, not at the drain, even when a source wants the port.
func TestForeignForwardsAreNeverTouched(t *testing.T) {
	p := &listPeer{fakePeer: newFakePeer()}
	p.hold(tcp("127.0.0.1", 6443), "guest")            // host-switch's static API forward
	p.hold(tcp("127.0.0.1", 2222), "192.168.127.2:22") // gvproxy's SSH forward
	p.hold(tcp("127.0.0.1", 7000), "guest")            // a user's, matching what the agent would make
	cfg := fastConfig()
	cfg.DrainTimeout = 5 * time.Second
	w := &listWatchPeer{listPeer: p, check: make(chan struct{})}
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", w, nil) })
	out := h.r.Emitter("src")
	out.Set(mapping("api", 6443))  // wanted, held by the peer already: works
	out.Set(mapping("ssh", 2222))  // wanted, held with another target: conflict
	out.Set(mapping("mine", 8080)) // the agent's own
	foreign := []string{"tcp 127.0.0.1:2222", "tcp 127.0.0.1:6443", "tcp 127.0.0.1:7000"}
	waitState(t, p.fakePeer, append(slices.Clone(foreign), "tcp 127.0.0.1:8080"))
	waitPortState(t, h, tcp("127.0.0.1", 6443), "p", core.PortElsewhere)
	waitPortState(t, h, tcp("127.0.0.1", 2222), "p", core.PortConflict)
	w.check <- struct{}{} // a reconcile
	out.Delete("api")
	out.Delete("ssh")
	out.Set(mapping("probe", 8081))
	waitState(t, p.fakePeer, append(slices.Clone(foreign), "tcp 127.0.0.1:8080", "tcp 127.0.0.1:8081"))
	h.stop()
	if got := p.state(); !slices.Equal(got, foreign) {
		t.Errorf("after the drain the peer has %q, want only the others' %q", got, foreign)
	}
	p.checkNoViolations(t)
}

func TestOwnershipRecordCleansUpAfterAKilledAgent(t *testing.T) {
	dir := t.TempDir()
	p := &listPeer{fakePeer: newFakePeer()}
	p.hold(tcp("127.0.0.1", 6443), "guest")
	cfg := fastConfig()
	cfg.StateDir = dir
	first := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	first.r.Emitter("src").Set(mapping("a", 8080))
	first.r.Emitter("src").Set(mapping("b", 8081))
	waitState(t, p.fakePeer, want(mapping("x", 6443, 8080, 8081)))
	first.stop() // no drain: as if killed
	if _, err := os.Stat(filepath.Join(dir, "p.json")); err != nil {
		t.Fatalf("no ownership record: %v", err)
	}

	// The next run wants only a: b is its own leftover, 6443 is not.
	cfg.DrainTimeout = 5 * time.Second
	second := startRouter(t, cfg, func(r *core.Router) {
		r.AddSink("p", p, nil)
		r.AddSource("src", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			<-ctx.Done()
			return nil
		}))
	})
	waitState(t, p.fakePeer, want(mapping("x", 6443, 8080)))
	waitPortState(t, second, tcp("127.0.0.1", 8080), "p", core.PortExposed)
	second.stop()
	waitState(t, p.fakePeer, want(mapping("x", 6443)))
	p.checkNoViolations(t)
	adds := 0
	for _, c := range p.changes() {
		if !c.Remove && c.Mapping.Ports[0].HostPort == 8080 {
			adds++
		}
	}
	if adds != 1 {
		t.Errorf("8080 was added %d times, want once: the second run must take the peer's for its own: %v", adds, p.changes())
	}
}

func TestOwnershipRecordForPlainSinks(t *testing.T) {
	dir := t.TempDir()
	p := newFakePeer()
	p.keying = core.ByPort
	cfg := fastConfig()
	cfg.StateDir = dir
	first := startRouter(t, cfg, func(r *core.Router) { r.AddSink("wsl", p, nil) })
	first.r.Emitter("src").Set(mapping("a", 8080, 8081))
	waitState(t, p, want(mapping("a", 8080, 8081)))
	first.stop()

	second := startRouter(t, cfg, func(r *core.Router) {
		r.AddSink("wsl", p, nil)
		r.AddSource("src", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.Snapshot([]core.Mapping{mapping("a", 8081)})
			<-ctx.Done()
			return nil
		}))
	})
	waitState(t, p, want(mapping("a", 8081)))
	waitPortState(t, second, tcp("127.0.0.1", 8081), "wsl", core.PortExposed)
	p.checkNoViolations(t)
}

// TestLeftoversGoOnceTheirSourceReports: of what a killed run left, the
// ports of a source that has reported and no longer wants them go at once,
// for a sink that can be listed and one that cannot, while another
// source has not reported yet (SyncGrace is an hour); that source's go
// only once it reports.
func TestLeftoversGoOnceTheirSourceReports(t *testing.T) {
	dir := t.TempDir()
	listed := &listPeer{fakePeer: newFakePeer()}
	plain := newFakePeer()
	plain.keying = core.ByPort
	cfg := fastConfig()
	cfg.StateDir = dir
	first := startRouter(t, cfg, func(r *core.Router) {
		r.AddSink("listed", listed, nil)
		r.AddSink("plain", plain, nil)
	})
	first.r.Emitter("docker").Set(mapping("a", 8080))
	first.r.Emitter("docker").Set(mapping("b", 8081))
	first.r.Emitter("kubernetes").Set(mapping("svc", 30080))
	all := want(mapping("x", 8080, 8081, 30080))
	waitState(t, listed.fakePeer, all)
	waitState(t, plain, all)
	first.stop() // no drain: as if killed

	cfg.SyncGrace = time.Hour
	report := make(chan []core.Mapping)
	second := startRouter(t, cfg, func(r *core.Router) {
		r.AddSink("listed", listed, nil)
		r.AddSink("plain", plain, nil)
		r.AddSource("docker", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			<-ctx.Done()
			return nil
		}))
		r.AddSource("kubernetes", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			select {
			case ms := <-report:
				out.Snapshot(ms)
			case <-ctx.Done():
			}
			<-ctx.Done()
			return nil
		}))
	})
	kept := want(mapping("x", 8080, 30080))
	waitState(t, listed.fakePeer, kept)
	waitState(t, plain, kept)
	report <- nil
	waitState(t, listed.fakePeer, want(mapping("x", 8080)))
	waitState(t, plain, want(mapping("x", 8080)))
	second.stop()
	listed.checkNoViolations(t)
	plain.checkNoViolations(t)
}

func TestPeerWatcherTriggersReplay(t *testing.T) {
	p := &watchPeer{fakePeer: newFakePeer(), check: make(chan struct{})}
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080))
	waitState(t, p.fakePeer, want(mapping("a", 8080)))
	p.set(func(f *fakePeer) { clear(f.held) })
	p.check <- struct{}{}
	waitState(t, p.fakePeer, want(mapping("a", 8080)))
}

// A permanent refusal of one port leaves the other ports of the same
// change exposed, and is never counted as delivered.
func TestPermanentRefusalKeepsTheOtherPorts(t *testing.T) {
	p := newFakePeer()
	p.reject = 2222
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	out.Set(mapping("a", 2222, 2223))
	waitState(t, p, want(mapping("a", 2223)))
	at := waitPortState(t, h, tcp("127.0.0.1", 2222), "p", core.PortRejected)
	if at.Error == "" {
		t.Error("the rejected port's status has no error")
	}
	time.Sleep(50 * time.Millisecond) // several backoff periods
	st := h.r.Status().Sinks[0]
	if st.Rejected != 1 || st.Failures != 0 || st.Delivered != 1 {
		t.Errorf("status = %+v, want one rejection, no retries, one delivery", st)
	}
	if n := p.sends.Load(); n != 2 {
		t.Errorf("sends = %d, want 2 (no retry of the rejected port)", n)
	}
	out.Delete("a")
	waitState(t, p, nil)
	for _, c := range p.changes() {
		if c.Remove && c.Mapping.Ports[0].HostPort == 2222 {
			t.Errorf("the port the peer refused was removed: %v", c)
		}
	}
}

// An IPv6 binding a peer cannot take, beside its IPv4 twin, is not a
// failure.
func TestUnsupportedTwinIsNotAFailure(t *testing.T) {
	p := ipv4Peer{newFakePeer()}
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	m := core.Mapping{Key: core.Key{ID: "a"}, Ports: []core.Port{tcp("0.0.0.0", 8080), tcp("::", 8080)}}
	h.r.Emitter("docker").Set(m)
	waitState(t, p.fakePeer, []string{"tcp 0.0.0.0:8080"})
	waitPortState(t, h, tcp("::", 8080), "p", core.PortUnsupported)
	h.r.Emitter("docker").Delete("a")
	waitState(t, p.fakePeer, nil)
	st := h.r.Status().Sinks[0]
	if st.Rejected != 0 || st.Failures != 0 || st.LastError != "" {
		t.Errorf("status = %+v, want no rejection, failure or error", st)
	}
	if n := p.sends.Load(); n != 2 {
		t.Errorf("sends = %d, want 2 (the IPv6 binding is never sent)", n)
	}
}

func TestLoopbackPolicy(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, core.RouterConfig{Policy: core.LoopbackOnly}, func(r *core.Router) { r.AddSink("p", p, nil) })
	m := core.Mapping{Key: core.Key{ID: "a"}, Ports: []core.Port{
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.IPv4Unspecified(), HostPort: 8080},
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.IPv6Unspecified(), HostPort: 8080},
		{Protocol: core.UDP, ContainerPort: 53, HostPort: 5353},
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.IPv4Unspecified(), HostPort: 80},
		{Protocol: core.TCP, ContainerPort: 80, HostIP: lo, HostPort: 0},
	}}
	h.r.Emitter("src").Set(m)
	waitState(t, p, []string{
		"tcp 127.0.0.1:8080",
		"tcp [::1]:8080",
		"udp 127.0.0.1:5353",
	})
	refused := h.r.Status().Refused
	if len(refused) != 2 || refused[0].Port.HostPort != 80 || refused[1].Port.HostPort != 0 {
		t.Fatalf("refused = %+v, want the privileged port and the invalid one", refused)
	}
}

func TestAcceptFilter(t *testing.T) {
	all, some := newFakePeer(), newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("all", all, nil)
		r.AddSink("some", some, func(k core.Key) bool { return k.Source != "private" })
	})
	h.r.Emitter("private").Set(mapping("a", 6443))
	h.r.Emitter("src").Set(mapping("b", 8080))
	waitState(t, all, want(mapping("a", 6443), mapping("b", 8080)))
	waitState(t, some, want(mapping("b", 8080)))
}

func TestDrainOnShutdown(t *testing.T) {
	p := newFakePeer()
	cfg := fastConfig()
	cfg.DrainTimeout = 5 * time.Second
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080, 8081))
	waitState(t, p, want(mapping("a", 8080, 8081)))
	h.stop()
	if s := p.state(); len(s) != 0 {
		t.Errorf("after shutdown the peer still exposes %v", s)
	}
}

func TestFailingSourceIsRestarted(t *testing.T) {
	p := newFakePeer()
	var runs atomic.Int64
	startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("p", p, nil)
		r.AddSource("flaky", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			if runs.Add(1) < 3 {
				return errors.New("engine not running")
			}
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			<-ctx.Done()
			return nil
		}))
	})
	waitState(t, p, want(mapping("a", 8080)))
	if runs.Load() != 3 {
		t.Errorf("runs = %d, want 3", runs.Load())
	}
}

func TestMappingWithoutIDIsIgnored(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("", 8080))
	h.r.Emitter("src").Set(mapping("ok", 8081))
	waitState(t, p, want(mapping("ok", 8081)))
	if len(h.r.Desired()) != 1 {
		t.Errorf("desired = %v", h.r.Desired())
	}
}

func TestDeliveredHookAndChangedSignal(t *testing.T) {
	p := newFakePeer()
	var mu sync.Mutex
	var got []string
	cfg := fastConfig()
	cfg.Delivered = func(sink, source string, remove bool, latency time.Duration) {
		mu.Lock()
		defer mu.Unlock()
		if latency < 0 {
			t.Errorf("negative latency %s", latency)
		}
		got = append(got, fmt.Sprintf("%s %s remove=%v", sink, source, remove))
	}
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	changed := h.r.Changed()
	h.r.Emitter("docker").Set(mapping("a", 8080))
	select {
	case <-changed:
	case <-time.After(waitFor):
		t.Fatal("Changed was not signalled by a new claim")
	}
	waitState(t, p, want(mapping("a", 8080)))
	h.r.Emitter("docker").Delete("a")
	waitState(t, p, nil)
	testenv.Eventually(t, waitFor, "two deliveries", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return len(got) == 2, fmt.Sprintf("Delivered calls %q", got)
	})
	mu.Lock()
	defer mu.Unlock()
	if got[0] != "p docker remove=false" || got[1] != "p docker remove=true" {
		t.Errorf("Delivered calls = %q", got)
	}
}

// TestSourcesInStatus checks that the status lists every registered source,
// whether it has reported its state, and how it says it watches.
func TestSourcesInStatus(t *testing.T) {
	p := newFakePeer()
	described := make(chan struct{})
	h := startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("p", p, nil)
		r.AddSource("quiet", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			<-ctx.Done()
			return nil
		}))
		r.AddSource("talker", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.(core.Describer).Describe("reading twice a second")
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			close(described)
			<-ctx.Done()
			return nil
		}))
	})
	<-described
	got := h.r.Status().Sources
	want := []core.SourceStatus{{Name: "quiet"}, {Name: "talker", Synced: true, Watching: "reading twice a second"}}
	if !slices.Equal(got, want) {
		t.Errorf("sources = %+v, want %+v", got, want)
	}
}
