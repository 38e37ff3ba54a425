// Package sinktest is the contract suite every sink passes. A sink's own
// test supplies a Harness that reads its peer's state (a real gvproxy, a
// protocol peer, a buffer) and calls Run. Each check says what it needs
// beyond core.Sink (a Harness function, an optional interface such as
// core.PeerWatcher) and is skipped with the reason when that is missing.
package sinktest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

// checks is the contract, in the order Run runs it on one peer. The direct
// checks call Send on sink instances of their own; the others emit
// into a Router that runs one instance, as in the agent, started before the
// first of them and stopped after the last. A check that lacks what it
// needs is skipped with the reason; once a check fails, the later ones
// that build on the state it left are skipped.
var checks = []check{
	{name: "add", via: direct, run: checkAdd},
	{name: "duplicate add", via: direct, run: checkDuplicateAdd},
	{name: "remove", via: direct, run: checkRemove},
	{name: "remove unknown", via: direct, run: checkRemoveUnknown},
	{name: "update", via: throughRouter, run: checkUpdate},
	{name: "resync after peer restart", via: throughRouter, needs: []need{needRestart, needPeerWatcher}, run: checkResyncAfterPeerRestart},
	{name: "changes while peer is down", via: throughRouter, needs: []need{needOutage}, run: checkChangesWhilePeerIsDown},
	{name: "cancellation", via: direct, alone: true, run: checkCancellation},
}

// check is one named part of the contract.
type check struct {
	name  string
	via   path
	needs []need // besides core.Sink and a PortFilter that takes the suite's ports
	alone bool   // does not build on the state the checks before it left
	run   func(*testing.T, *suite)
}

// need is what a check needs beyond core.Sink: an optional interface of
// the sink or a function of the Harness.
type need struct {
	what string // the interface or Harness field
	why  string // what the check cannot do without it
	has  func(*suite) bool
}

// The needs of checks.
var (
	needRestart = need{"Harness.Restart", "the suite cannot restart the peer",
		func(s *suite) bool { return s.h.Restart != nil }}
	needOutage = need{"Harness.Outage", "the suite cannot stop the peer",
		func(s *suite) bool { return s.h.Outage != nil }}
	needPeerWatcher = need{"core.PeerWatcher", "without it the router only notices a restarted peer at its next change",
		func(s *suite) bool { return s.caps.watcher }}
)

// path is how a check reaches the sink.
type path int

const (
	direct        path = iota // Send on instances the check makes
	throughRouter             // emit into suite.rt, the Router running one instance
)

// The mappings the checks send. Their ports are below the ephemeral range
// (32768 and up), so that no port a test picks as free a moment ago is
// taken by the peer.
var (
	m1        = Mapping("test", "one", 11001, 2)
	m1b       = Mapping("test", "one", 11002, 2) // keeps 11002, drops 11001, adds 11003
	m2        = Mapping("test", "two", 11011, 1)
	m3        = Mapping("test", "three", 11021, 1)
	cancelled = Mapping("test", "cancelled", 11031, 1)
)

// Harness tells the suite how to build the sink and read its peer.
type Harness struct {
	// New returns a sink connected to the peer. The suite may call it more
	// than once; every instance talks to the same peer.
	New func(t *testing.T) core.Sink
	// State returns what the peer exposes now, one entry per exposed port,
	// in the form Entries produces.
	State func(t *testing.T) []string
	// Entries returns the peer entries the ports of m should produce.
	// Default: DefaultEntries.
	Entries func(m core.Mapping) []string
	// Restart, if set, restarts the peer so that it loses its state.
	Restart func(t *testing.T)
	// Outage, if set, stops the peer, calls during, then starts it again.
	// The peer must stay unreachable until during returns: during returns
	// once the sink has reported the outage to the Router (or the check
	// has given up waiting for it).
	Outage func(t *testing.T, during func())
	// Timeout bounds every wait (default 30s).
	Timeout time.Duration
}

// DefaultEntries renders each port as "proto hostIP:hostPort".
func DefaultEntries(m core.Mapping) []string {
	out := make([]string, 0, len(m.Ports))
	for _, p := range m.Ports {
		out = append(out, Entry(p))
	}
	return out
}

// Entry renders one port as "proto hostIP:hostPort".
func Entry(p core.Port) string {
	ip := p.HostIP
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return fmt.Sprintf("%s %s", p.Protocol, netip.AddrPortFrom(ip, p.HostPort))
}

// Mapping returns a valid mapping with id and n tcp ports on 127.0.0.1,
// starting at host port base, for suites and tests.
func Mapping(source, id string, base uint16, n int) core.Mapping {
	m := core.Mapping{Key: core.Key{Source: source, ID: id}}
	for i := range n {
		m.Ports = append(m.Ports, core.Port{
			Protocol: core.TCP, ContainerPort: 80 + uint16(i),
			HostIP: netip.AddrFrom4([4]byte{127, 0, 0, 1}), HostPort: base + uint16(i),
		})
	}
	return m.Normalize()
}

// Run runs the contract suite against h: every check, as a subtest named
// for it, in order, on one peer. A check stops at its first failure. It
// leaves the peer empty.
func Run(t *testing.T, h Harness) {
	t.Helper()
	if h.New == nil || h.State == nil {
		t.Fatal("sinktest: Harness needs New and State")
	}
	if h.Timeout <= 0 {
		h.Timeout = 30 * time.Second
	}
	if h.Entries == nil {
		h.Entries = DefaultEntries
	}
	s := &suite{h: h, caps: probe(t, h)}
	defer s.stopRouter()
	var failed string // the first check that failed
	for _, c := range checks {
		switch {
		case c.via == throughRouter && s.rt == nil && failed == "":
			s.rt = newRouted(t, h)
		case c.via != throughRouter && s.rt != nil:
			s.stopRouter()
		}
		ok := t.Run(c.name, func(t *testing.T) {
			if failed != "" && !c.alone {
				t.Skipf("not run: %q failed before it and left the peer's state unknown", failed)
			}
			if s.caps.refused != "" {
				t.Skipf("needs its ports taken: %s", s.caps.refused)
			}
			for _, n := range c.needs {
				if !n.has(s) {
					t.Skipf("needs %s: %s", n.what, n.why)
				}
			}
			c.run(t, s)
		})
		if !ok && failed == "" {
			failed = c.name
		}
	}
	s.stopRouter()
	// Leave the peer empty for the next user.
	cleanup := h.New(t)
	for _, m := range []core.Mapping{m1, m1b, m2, m3, cancelled} {
		_ = cleanup.Send(context.Background(), core.Change{Remove: true, Mapping: m})
	}
	if c, ok := cleanup.(io.Closer); ok {
		_ = c.Close()
	}
}

// checkAdd: Send of an add makes the peer expose the mapping's ports.
func checkAdd(t *testing.T, s *suite) {
	snk := s.h.New(t)
	if err := snk.Send(context.Background(), core.Change{Mapping: m1}); err != nil {
		t.Fatalf("add: Send returned %v", err)
	}
	s.waitState(t, m1)
}

// checkDuplicateAdd: adding ports the peer already has, from a new
// instance, succeeds (or says they are held elsewhere) and leaves each
// exposed once.
func checkDuplicateAdd(t *testing.T, s *suite) {
	snk := s.h.New(t)
	// A peer that lists its entries cannot tell this agent's from
	// another party's: it may say the port is held elsewhere, and the
	// router's ownership record decides.
	if err := snk.Send(context.Background(), core.Change{Mapping: m1}); err != nil && !errors.Is(err, core.ErrHeldElsewhere) {
		t.Fatalf("second add of the same ports: Send returned %v; want nil or an error marked core.HeldElsewhere", err)
	}
	s.waitState(t, m1)
}

// checkRemove: Send of a remove, from a new instance, makes the peer drop
// the ports.
func checkRemove(t *testing.T, s *suite) {
	snk := s.h.New(t)
	if err := snk.Send(context.Background(), core.Change{Remove: true, Mapping: m1}); err != nil {
		t.Fatalf("remove: Send returned %v", err)
	}
	s.waitState(t)
}

// checkRemoveUnknown: removing ports the peer never had succeeds.
func checkRemoveUnknown(t *testing.T, s *suite) {
	snk := s.h.New(t)
	if err := snk.Send(context.Background(), core.Change{Remove: true, Mapping: m2}); err != nil {
		t.Fatalf("removing what was never added must succeed: Send returned %v", err)
	}
	s.waitState(t)
}

// checkUpdate: through the router, a mapping whose ports change ends with
// exactly its new ports on the peer, beside another mapping's, and a
// deleted mapping's ports go.
func checkUpdate(t *testing.T, s *suite) {
	s.rt.emit.Set(m1)
	s.waitState(t, m1)
	s.rt.emit.Set(m1b)
	s.waitState(t, m1b)
	s.rt.emit.Set(m2)
	s.waitState(t, m1b, m2)
	s.rt.emit.Delete(m1b.ID)
	s.waitState(t, m2)
}

// checkResyncAfterPeerRestart: a peer that restarts and loses its state
// gets it all back, with no change to deliver meanwhile: the sink's
// WatchPeer must notice the restart.
func checkResyncAfterPeerRestart(t *testing.T, s *suite) {
	s.rt.emit.Set(m1)
	s.waitState(t, m1, m2)
	s.h.Restart(t)
	s.waitState(t, m1, m2)
}

// checkChangesWhilePeerIsDown: while the peer is down the sink reports it,
// and the changes made meanwhile reach the peer once it is back. A Send
// from a new instance must fail with an error marked core.PeerDown; the
// Router's instance must report it too (a Send so marked, or a failed
// List), and no call of it may return nil. The peer stays down until the
// router's instance has reported it, however long its delivery takes.
func checkChangesWhilePeerIsDown(t *testing.T, s *suite) {
	s.rt.emit.Set(m1)
	s.waitState(t, m1, m2)
	var called bool
	var report string
	s.h.Outage(t, func() {
		called = true
		s.rt.rec.beginOutage()
		s.rt.emit.Delete(m1.ID)
		s.rt.emit.Set(m3)
		report = sendWhileDown(t, s.h)
		wait := s.h.Timeout
		if report != "" {
			wait = 0 // the verdict is in: only end the recording
		}
		if r := s.rt.rec.awaitOutageReport(wait); report == "" {
			report = r
		}
	})
	if !called {
		t.Fatal("Harness.Outage returned without calling during")
	}
	if report != "" {
		t.Fatal(report)
	}
	s.waitState(t, m2, m3)
}

// sendWhileDown sends an add, from a new instance, to the peer that is
// down, and returns "" when Send reports it with core.PeerDown, and
// otherwise why the sink fails the contract. The add is m3's, which the
// router adds once the peer is back: should a sink that hides the outage
// deliver it later, the peer ends up with no port the check does not want.
func sendWhileDown(t *testing.T, h Harness) string {
	snk := h.New(t)
	if c, ok := snk.(io.Closer); ok {
		defer c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	defer cancel()
	o := outcome{op: "Send", what: describe(core.Change{Mapping: m3})}
	o.err = snk.Send(ctx, core.Change{Mapping: m3})
	switch {
	case errors.Is(o.err, core.ErrPeerDown):
		return ""
	case o.err == nil:
		return fmt.Sprintf("Send returned nil while the peer was down: %s (%s, from a new instance, returned nil)", mustReport, o)
	case ctx.Err() != nil:
		return fmt.Sprintf("Send did not return within %s while the peer was down: %s, and return soon (%s: %v)", h.Timeout, mustReport, o, o.err)
	default:
		return fmt.Sprintf("Send failed while the peer was down with an error not marked core.PeerDown: %s (%s: %v)", mustReport, o, o.err)
	}
}

// checkCancellation: Send, and WatchPeer where the sink has it, return
// soon when their context is already cancelled, and once the sink is
// closed (where it is an io.Closer) no goroutine is left behind.
func checkCancellation(t *testing.T, s *suite) {
	ignore := goleak.IgnoreCurrent()
	snk := s.h.New(t)
	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = snk.Send(cctx, core.Change{Mapping: cancelled})
		if pw, ok := snk.(core.PeerWatcher); ok {
			pw.WatchPeer(cctx, func() {})
		}
	}()
	select {
	case <-done:
	case <-time.After(s.h.Timeout):
		t.Fatalf("Send/WatchPeer with a cancelled context did not return within %s", s.h.Timeout)
	}
	if c, ok := snk.(io.Closer); ok {
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	if err := goleak.Find(ignore); err != nil {
		t.Fatalf("goroutines left behind: %v", err)
	}
}

// suite is the state the checks share.
type suite struct {
	h    Harness
	caps caps
	rt   *routed // the running Router, for the routed checks; nil otherwise
}

// caps is what an instance of the sink implements beyond core.Sink.
type caps struct {
	watcher bool
	// refused says which port of the suite's the sink's PortFilter
	// refuses, and why; empty when it takes them all.
	refused string
}

// probe makes an instance of the sink to learn what it implements, and
// closes it.
func probe(t *testing.T, h Harness) caps {
	t.Helper()
	snk := h.New(t)
	var c caps
	_, c.watcher = snk.(core.PeerWatcher)
	if f, ok := snk.(core.PortFilter); ok {
	search:
		for _, m := range []core.Mapping{m1, m1b, m2, m3, cancelled} {
			for _, p := range m.Ports {
				if err := f.Supports(p); err != nil {
					c.refused = fmt.Sprintf("the sink's core.PortFilter refuses %s: %v", Entry(p), err)
					break search
				}
			}
		}
	}
	if cl, ok := snk.(io.Closer); ok {
		_ = cl.Close()
	}
	return c
}

// waitState waits until the peer exposes exactly the ports of ms, each once.
func (s *suite) waitState(t *testing.T, ms ...core.Mapping) {
	t.Helper()
	var want []string
	for _, m := range ms {
		want = append(want, s.h.Entries(m)...)
	}
	slices.Sort(want)
	testenv.Eventually(t, s.h.Timeout, fmt.Sprintf("the peer to have %q", want), func() (bool, string) {
		got := slices.Clone(s.h.State(t))
		slices.Sort(got)
		detail := fmt.Sprintf("it has %q", got)
		if s.rt != nil {
			if err := s.rt.rec.lastError(); err != nil {
				detail += fmt.Sprintf("; the sink's last error: %v", err)
			}
		}
		return slices.Equal(got, want), detail
	})
}

// stopRouter stops the Router of the routed checks, if it runs.
func (s *suite) stopRouter() {
	if s.rt != nil {
		s.rt.stop()
		s.rt = nil
	}
}

// routed is a Router running one instance of the sink, fed by emit.
type routed struct {
	emit   core.Emitter
	rec    *recorder // the instance, as the Router sees it
	cancel context.CancelFunc
	done   chan struct{}
}

// newRouted starts a Router whose only sink is a new instance from h,
// seen through a recorder; the Router closes it when it stops.
func newRouted(t *testing.T, h Harness) *routed {
	r := core.NewRouter(core.RouterConfig{
		Backoff:   core.Backoff{Initial: 50 * time.Millisecond, Max: time.Second},
		SyncGrace: 50 * time.Millisecond,
	})
	rec, snk := record(h.New(t))
	r.AddSink("under-test", snk, nil)
	ctx, cancel := context.WithCancel(context.Background())
	rt := &routed{emit: r.Emitter("test"), rec: rec, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(rt.done)
		_ = r.Run(ctx)
	}()
	return rt
}

// stop stops the Router and waits for Run to return.
func (r *routed) stop() {
	r.cancel()
	<-r.done
}
