package core_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
)

// fakePeer is an in-memory peer behind a controllable sink.
type fakePeer struct {
	mu      sync.Mutex
	exposed map[string]bool // "source/id proto hostport"
	log     []core.Change
	down    bool          // every Send fails with PeerDown
	failN   int           // the next failN sends fail (transient)
	reject  uint16        // adds of this host port fail permanently
	block   chan struct{} // when set, Send waits for it to close
	sends   atomic.Int64
}

func newFakePeer() *fakePeer { return &fakePeer{exposed: map[string]bool{}} }

func entry(k core.Key, p core.Port) string {
	return fmt.Sprintf("%s %s %s:%d", k, p.Protocol, p.HostIP, p.HostPort)
}

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
	for _, p := range c.Mapping.Ports {
		if !c.Remove && p.HostPort == f.reject {
			return core.Permanent(fmt.Errorf("cannot expose %v", p))
		}
	}
	f.log = append(f.log, c)
	for _, p := range c.Mapping.Ports {
		if c.Remove {
			delete(f.exposed, entry(c.Mapping.Key, p))
		} else {
			f.exposed[entry(c.Mapping.Key, p)] = true
		}
	}
	return nil
}

func (f *fakePeer) state() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for e := range f.exposed {
		out = append(out, e)
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

// syncPeer adds Sync to fakePeer.
type syncPeer struct {
	*fakePeer
	syncs atomic.Int64
}

func (s *syncPeer) Sync(_ context.Context, desired []core.Mapping) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return core.PeerDown(errors.New("connection refused"))
	}
	s.syncs.Add(1)
	clear(s.exposed)
	for _, m := range desired {
		for _, p := range m.Ports {
			s.exposed[entry(m.Key, p)] = true
		}
	}
	return nil
}

// watchPeer adds WatchPeer to fakePeer: a value on lost triggers a report.
type watchPeer struct {
	*fakePeer
	lost chan struct{}
}

func (w *watchPeer) WatchPeer(ctx context.Context, lost func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.lost:
			lost()
		}
	}
}

var lo = netip.MustParseAddr("127.0.0.1")

func mapping(id string, ports ...uint16) core.Mapping {
	m := core.Mapping{Key: core.Key{ID: id}}
	for _, p := range ports {
		m.Ports = append(m.Ports, core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: lo, HostPort: p})
	}
	return m
}

func want(source string, ms ...core.Mapping) []string {
	var out []string
	for _, m := range ms {
		m.Source = source
		for _, p := range m.Ports {
			out = append(out, entry(m.Key, p))
		}
	}
	slices.Sort(out)
	return out
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitState(t *testing.T, p *fakePeer, w []string) {
	t.Helper()
	eventually(t, fmt.Sprintf("peer state %q (have %q)", w, p.state()), func() bool { return slices.Equal(p.state(), w) })
}

type harness struct {
	r      *core.Router
	cancel context.CancelFunc
	done   chan struct{}
}

func fastConfig() core.RouterConfig {
	return core.RouterConfig{
		Backoff:   core.Backoff{Initial: 5 * time.Millisecond, Max: 20 * time.Millisecond},
		SyncGrace: 20 * time.Millisecond,
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

func TestAddUpdateRemove(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")

	out.Set(mapping("a", 8080, 8081))
	waitState(t, p, want("src", mapping("a", 8080, 8081)))

	out.Set(mapping("a", 8081, 8082))
	waitState(t, p, want("src", mapping("a", 8081, 8082)))
	log := p.changes()
	if len(log) != 3 || !log[1].Remove || log[2].Remove {
		t.Fatalf("update should be add, remove(went), add(came); got %v", log)
	}
	if got := log[1].Mapping.Ports; len(got) != 1 || got[0].HostPort != 8080 {
		t.Errorf("remove should carry only the port that went, got %v", got)
	}
	if got := log[2].Mapping.Ports; len(got) != 1 || got[0].HostPort != 8082 {
		t.Errorf("add should carry only the port that came, got %v", got)
	}

	out.Set(mapping("a", 8082, 8081)) // same ports, other order: no change
	out.Delete("unknown")             // nothing to do
	out.Set(mapping("b", 9000))
	waitState(t, p, want("src", mapping("a", 8081, 8082), mapping("b", 9000)))
	if n := len(p.changes()); n != 4 {
		t.Errorf("duplicate set or unknown delete produced changes: %v", p.changes()[3:])
	}
	out.Delete("a")
	waitState(t, p, want("src", mapping("b", 9000)))
	out.Set(mapping("b")) // no ports left is a removal
	waitState(t, p, nil)
}

func TestConnectAddrChangeReplacesPorts(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	m := mapping("a", 8080)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	out.Set(m)
	waitState(t, p, want("src", m))
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.3:80"}}
	out.Set(m)
	eventually(t, "remove and re-add", func() bool { return len(p.changes()) == 3 })
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
	waitState(t, p, append(want("one", mapping("a", 8080), mapping("b", 8081)), want("two", mapping("a", 9090))...))
	one.Snapshot([]core.Mapping{mapping("b", 8081), mapping("c", 8082)})
	w := append(want("one", mapping("b", 8081), mapping("c", 8082)), want("two", mapping("a", 9090))...)
	slices.Sort(w)
	waitState(t, p, w)
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
	case <-time.After(10 * time.Second):
		t.Fatal("the source was blocked by a stuck sink")
	}
	var w []string
	for i := 250; i < 500; i++ {
		w = append(w, want("src", mapping(fmt.Sprint(i), uint16(20000+i)))...)
	}
	slices.Sort(w)
	waitState(t, fast, w)
	close(release)
	waitState(t, slow, w)
	// The stuck sink's queue coalesced: it never exposed the ports that went
	// while it was stuck, apart from the one it was holding.
	if n := slow.sends.Load(); n > 252 {
		t.Errorf("slow sink got %d sends for 250 surviving mappings; queue did not coalesce", n)
	}
}

func TestRetryAfterTransientFailure(t *testing.T) {
	p := newFakePeer()
	p.failN = 3
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080))
	waitState(t, p, want("src", mapping("a", 8080)))
	st := h.r.Status().Sinks[0]
	if st.Failures != 3 || st.Delivered != 1 || st.LastError == "" {
		t.Errorf("status = %+v, want 3 failures, 1 delivery and the last error", st)
	}
}

func TestReplayAfterPeerDown(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	out.Set(mapping("a", 8080))
	out.Set(mapping("b", 8081))
	waitState(t, p, want("src", mapping("a", 8080), mapping("b", 8081)))

	// The peer goes down and comes back empty (it restarted).
	p.set(func(f *fakePeer) { f.down = true })
	out.Set(mapping("c", 8082))
	out.Delete("b")
	eventually(t, "a failed delivery", func() bool { return h.r.Status().Sinks[0].PeerDown })
	p.set(func(f *fakePeer) { f.down = false; clear(f.exposed) })
	waitState(t, p, want("src", mapping("a", 8080), mapping("c", 8082)))
}

func TestSyncerGetsFullState(t *testing.T) {
	p := &syncPeer{fakePeer: newFakePeer()}
	p.exposed["src/leftover tcp 127.0.0.1:7000"] = true // from a previous agent
	h := startRouter(t, fastConfig(), func(r *core.Router) {
		r.AddSink("p", p, nil)
		r.AddSource("src", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
			out.Snapshot([]core.Mapping{mapping("a", 8080)})
			<-ctx.Done()
			return nil
		}))
	})
	waitState(t, p.fakePeer, want("src", mapping("a", 8080)))
	if p.syncs.Load() != 1 {
		t.Errorf("initial syncs = %d, want 1", p.syncs.Load())
	}
	p.set(func(f *fakePeer) { f.down = true })
	h.r.Emitter("src").Set(mapping("b", 8081))
	eventually(t, "a failed delivery", func() bool { return h.r.Status().Sinks[0].PeerDown })
	p.set(func(f *fakePeer) { f.down = false; clear(f.exposed) })
	waitState(t, p.fakePeer, want("src", mapping("a", 8080), mapping("b", 8081)))
	if p.syncs.Load() < 2 {
		t.Errorf("no Sync after the peer came back")
	}
}

func TestPeerWatcherTriggersReplay(t *testing.T) {
	p := &watchPeer{fakePeer: newFakePeer(), lost: make(chan struct{})}
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080))
	waitState(t, p.fakePeer, want("src", mapping("a", 8080)))
	p.set(func(f *fakePeer) { clear(f.exposed) })
	p.lost <- struct{}{}
	waitState(t, p.fakePeer, want("src", mapping("a", 8080)))
}

func TestPermanentFailureIsNotRetried(t *testing.T) {
	p := newFakePeer()
	p.reject = 8081
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	out := h.r.Emitter("src")
	out.Set(mapping("bad", 8081))
	out.Set(mapping("good", 8082))
	waitState(t, p, want("src", mapping("good", 8082)))
	time.Sleep(50 * time.Millisecond) // several backoff periods
	st := h.r.Status().Sinks[0]
	if st.Rejected != 1 || st.Failures != 0 {
		t.Errorf("status = %+v, want one rejection and no retries", st)
	}
	if n := p.sends.Load(); n != 2 {
		t.Errorf("sends = %d, want 2 (no retry of the rejected change)", n)
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
		"src/a tcp 127.0.0.1:8080",
		"src/a tcp ::1:8080",
		"src/a udp 127.0.0.1:5353",
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
	waitState(t, all, append(want("private", mapping("a", 6443)), want("src", mapping("b", 8080))...))
	waitState(t, some, want("src", mapping("b", 8080)))
}

func TestDrainOnShutdown(t *testing.T) {
	p := newFakePeer()
	cfg := fastConfig()
	cfg.DrainTimeout = 5 * time.Second
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080, 8081))
	waitState(t, p, want("src", mapping("a", 8080, 8081)))
	h.stop()
	if s := p.state(); len(s) != 0 {
		t.Errorf("after shutdown the peer still exposes %v", s)
	}
}

func TestFailingSourceIsRestarted(t *testing.T) {
	p := newFakePeer()
	var runs atomic.Int64
	h := startRouter(t, fastConfig(), func(r *core.Router) {
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
	waitState(t, p, want("flaky", mapping("a", 8080)))
	if runs.Load() != 3 {
		t.Errorf("runs = %d, want 3", runs.Load())
	}
	_ = h
}

func TestMappingWithoutIDIsIgnored(t *testing.T) {
	p := newFakePeer()
	h := startRouter(t, fastConfig(), func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("", 8080))
	h.r.Emitter("src").Set(mapping("ok", 8081))
	waitState(t, p, want("src", mapping("ok", 8081)))
	if len(h.r.Desired()) != 1 {
		t.Errorf("desired = %v", h.r.Desired())
	}
}
