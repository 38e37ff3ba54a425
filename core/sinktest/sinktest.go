// Package sinktest is the contract suite every sink passes. A sink's own
// test supplies a Harness that reads its peer's state (a real gvproxy, a
// protocol peer, a buffer) and calls Run.
package sinktest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/guestagent/guestagent/core"
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

// Run runs the contract suite against h, in order, on one peer.
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
	s := &suite{h: h}
	ctx := context.Background()
	// Ports below the ephemeral range (32768 and up), so that no port a test
	// picks as free a moment ago is taken by the peer.
	m1 := Mapping("test", "one", 11001, 2)
	m2 := Mapping("test", "two", 11011, 1)

	t.Run("add", func(t *testing.T) {
		snk := h.New(t)
		if err := snk.Send(ctx, core.Change{Mapping: m1}); err != nil {
			t.Fatalf("add: %v", err)
		}
		s.waitState(t, m1)
	})
	t.Run("duplicate add", func(t *testing.T) {
		snk := h.New(t)
		// A peer that lists its entries cannot tell this agent's from
		// another party's: it may say the port is held elsewhere, and the
		// router's ownership record decides.
		if err := snk.Send(ctx, core.Change{Mapping: m1}); err != nil && !errors.Is(err, core.ErrHeldElsewhere) {
			t.Fatalf("second add of the same ports: %v", err)
		}
		s.waitState(t, m1)
	})
	t.Run("remove", func(t *testing.T) {
		snk := h.New(t)
		if err := snk.Send(ctx, core.Change{Remove: true, Mapping: m1}); err != nil {
			t.Fatalf("remove: %v", err)
		}
		s.waitState(t)
	})
	t.Run("remove unknown", func(t *testing.T) {
		snk := h.New(t)
		if err := snk.Send(ctx, core.Change{Remove: true, Mapping: m2}); err != nil {
			t.Fatalf("removing what was never added must succeed, got %v", err)
		}
		s.waitState(t)
	})

	// The rest goes through a Router, as in the agent.
	rt := newRouted(t, h)
	defer rt.stop()
	t.Run("update", func(t *testing.T) {
		rt.emit.Set(m1)
		s.waitState(t, m1)
		m1b := Mapping("test", "one", 11002, 2) // keeps 11002, drops 11001, adds 11003
		rt.emit.Set(m1b)
		s.waitState(t, m1b)
		rt.emit.Set(m2)
		s.waitState(t, m1b, m2)
		rt.emit.Delete(m1b.ID)
		s.waitState(t, m2)
	})
	t.Run("resync after peer restart", func(t *testing.T) {
		if h.Restart == nil {
			t.Skip("peer cannot be restarted by the harness")
		}
		rt.emit.Set(m1)
		s.waitState(t, m1, m2)
		h.Restart(t)
		s.waitState(t, m1, m2)
	})
	t.Run("changes while peer is down", func(t *testing.T) {
		if h.Outage == nil {
			t.Skip("peer cannot be stopped by the harness")
		}
		rt.emit.Set(m1)
		s.waitState(t, m1, m2)
		m3 := Mapping("test", "three", 11021, 1)
		h.Outage(t, func() {
			rt.emit.Delete(m1.ID)
			rt.emit.Set(m3)
		})
		s.waitState(t, m2, m3)
	})
	rt.stop()
	t.Run("cancellation", func(t *testing.T) {
		ignore := goleak.IgnoreCurrent()
		snk := h.New(t)
		cctx, cancel := context.WithCancel(context.Background())
		cancel()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = snk.Send(cctx, core.Change{Mapping: Mapping("test", "cancelled", 11031, 1)})
			if pw, ok := snk.(core.PeerWatcher); ok {
				pw.WatchPeer(cctx, func() {})
			}
		}()
		select {
		case <-done:
		case <-time.After(h.Timeout):
			t.Fatalf("Send/WatchPeer with a cancelled context did not return within %s", h.Timeout)
		}
		if c, ok := snk.(interface{ Close() error }); ok {
			_ = c.Close()
		}
		if err := goleak.Find(ignore); err != nil {
			t.Errorf("goroutines left behind: %v", err)
		}
	})
	// Leave the peer empty for the next user.
	cleanup := h.New(t)
	for _, m := range []core.Mapping{m1, m2, Mapping("test", "three", 11021, 1), Mapping("test", "cancelled", 11031, 1)} {
		_ = cleanup.Send(ctx, core.Change{Remove: true, Mapping: m})
	}
}

type suite struct{ h Harness }

// waitState waits until the peer exposes exactly the ports of ms, each once.
func (s *suite) waitState(t *testing.T, ms ...core.Mapping) {
	t.Helper()
	var want []string
	for _, m := range ms {
		want = append(want, s.h.Entries(m)...)
	}
	slices.Sort(want)
	deadline := time.Now().Add(s.h.Timeout)
	for {
		got := slices.Clone(s.h.State(t))
		slices.Sort(got)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s the peer has %q, want %q", s.h.Timeout, got, want)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

type routed struct {
	emit   core.Emitter
	cancel context.CancelFunc
	done   chan struct{}
}

func newRouted(t *testing.T, h Harness) *routed {
	r := core.NewRouter(core.RouterConfig{
		Backoff:   core.Backoff{Initial: 50 * time.Millisecond, Max: time.Second},
		SyncGrace: 50 * time.Millisecond,
	})
	r.AddSink("under-test", h.New(t), nil)
	ctx, cancel := context.WithCancel(context.Background())
	rt := &routed{emit: r.Emitter("test"), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(rt.done)
		_ = r.Run(ctx)
	}()
	return rt
}

func (r *routed) stop() {
	r.cancel()
	<-r.done
}
