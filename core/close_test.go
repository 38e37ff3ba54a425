package core_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
)

// closingPeer is a fakePeer with WatchPeer and Close that keeps, in order,
// what the router called: every Send as it returns, WatchPeer's return and
// Close, and notes a Close that came while a call was under way.
type closingPeer struct {
	*fakePeer
	closeErr error

	cmu      sync.Mutex
	calls    []string
	inFlight int  // Send and WatchPeer calls under way
	early    bool // Close came while a call was under way
}

func newClosingPeer() *closingPeer { return &closingPeer{fakePeer: newFakePeer()} }

func (c *closingPeer) enter() {
	c.cmu.Lock()
	defer c.cmu.Unlock()
	c.inFlight++
}

func (c *closingPeer) leave(call string) {
	c.cmu.Lock()
	defer c.cmu.Unlock()
	c.inFlight--
	c.calls = append(c.calls, call)
}

func (c *closingPeer) Send(ctx context.Context, ch core.Change) error {
	c.enter()
	err := c.fakePeer.Send(ctx, ch)
	op := "add"
	if ch.Remove {
		op = "remove"
	}
	c.leave(fmt.Sprintf("send %s %d", op, ch.Mapping.Ports[0].HostPort))
	return err
}

func (c *closingPeer) WatchPeer(ctx context.Context, check func()) {
	c.enter()
	<-ctx.Done()
	c.leave("watch returned")
}

func (c *closingPeer) Close() error {
	c.cmu.Lock()
	defer c.cmu.Unlock()
	if c.inFlight > 0 {
		c.early = true
	}
	c.calls = append(c.calls, "close")
	return c.closeErr
}

// log returns the calls so far, and whether Close came too early.
func (c *closingPeer) log() ([]string, bool) {
	c.cmu.Lock()
	defer c.cmu.Unlock()
	return append([]string(nil), c.calls...), c.early
}

// closes counts the calls of Close so far.
func (c *closingPeer) closes() int {
	calls, _ := c.log()
	n := 0
	for _, call := range calls {
		if call == "close" {
			n++
		}
	}
	return n
}

// TestRouterClosesSinksAfterTheirLastCall checks that when Run returns it
// has closed a sink that is an io.Closer, once, after the drain's last Send
// and the peer watcher's return, and with no call under way.
func TestRouterClosesSinksAfterTheirLastCall(t *testing.T) {
	p := newClosingPeer()
	cfg := fastConfig()
	cfg.DrainTimeout = 5 * time.Second
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", p, nil) })
	h.r.Emitter("src").Set(mapping("a", 8080))
	waitState(t, p.fakePeer, want(mapping("a", 8080)))
	if n := p.closes(); n != 0 {
		t.Fatalf("the sink was closed %d times while the router ran", n)
	}
	h.stop()

	calls, early := p.log()
	if early {
		t.Errorf("Close came while a Send or WatchPeer was under way; calls %q", calls)
	}
	if n := p.closes(); n != 1 {
		t.Fatalf("Close was called %d times, want once; calls %q", n, calls)
	}
	if calls[len(calls)-1] != "close" {
		t.Errorf("the router called the sink after Close: %q", calls)
	}
	if !slices.Contains(calls, "send remove 8080") || !slices.Contains(calls, "watch returned") {
		t.Errorf("calls %q lack the drain's remove or WatchPeer's return", calls)
	}
}

// TestRouterClosesASinkOnceAndLogsItsError checks that a sink added under
// two names is closed once, that the error Close returns is logged with the
// sink's name, that sinks that are no pointers, of a type that cannot even
// be compared, are each closed, without a panic, and that a sink that is no
// io.Closer is fine.
func TestRouterClosesASinkOnceAndLogsItsError(t *testing.T) {
	obs, logs := observer.New(zapcore.InfoLevel)
	p := newClosingPeer()
	p.closeErr = errors.New("connection already closed")
	closes := &counter{}
	cfg := fastConfig()
	cfg.Log = zap.New(obs)
	h := startRouter(t, cfg, func(r *core.Router) {
		r.AddSink("first", p, func(k core.Key) bool { return k.Source == "one" })
		r.AddSink("second", p, func(k core.Key) bool { return k.Source == "two" })
		r.AddSink("plain", newFakePeer(), nil)
		r.AddSink("uncomparable", uncomparableSink{closes: closes}, nil)
		r.AddSink("uncomparable too", uncomparableSink{closes: closes}, nil)
	})
	h.r.Emitter("one").Set(mapping("a", 8080))
	h.r.Emitter("two").Set(mapping("b", 8081))
	waitState(t, p.fakePeer, want(mapping("a", 8080), mapping("b", 8081)))
	h.stop()

	if n := p.closes(); n != 1 {
		calls, _ := p.log()
		t.Errorf("a sink added under two names was closed %d times, want once; calls %q", n, calls)
	}
	if n := closes.count(); n != 2 {
		t.Errorf("two sinks of a type that cannot be compared were closed %d times, want twice", n)
	}
	warned := logs.FilterMessage("could not close the sink").All()
	if len(warned) != 1 {
		t.Fatalf("logged %d failures to close, want one: %v", len(warned), logs.All())
	}
	fields := warned[0].ContextMap()
	if fields["sink"] != "first" || fields["error"] != "connection already closed" {
		t.Errorf("the failure to close is logged with %v, want sink first and the error", fields)
	}
}

// uncomparableSink is a sink whose type cannot be compared (it holds a
// slice), so that telling two of them apart would panic.
type uncomparableSink struct {
	_      []int
	closes *counter
}

func (uncomparableSink) Send(context.Context, core.Change) error { return nil }

func (s uncomparableSink) Close() error {
	s.closes.add()
	return nil
}

// counter counts calls from any goroutine.
type counter struct {
	mu sync.Mutex
	n  int
}

func (c *counter) add() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
}

func (c *counter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// TestSecondRunClosesNothing checks that a Run that returns at once, its
// context done, still closes the sinks, and that a second Run, refused,
// closes nothing again.
func TestSecondRunClosesNothing(t *testing.T) {
	p := newClosingPeer()
	r := core.NewRouter(fastConfig())
	r.AddSink("p", p, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := p.closes(); n != 1 {
		t.Fatalf("Close was called %d times by a Run that returned, want once", n)
	}
	if err := r.Run(ctx); err == nil {
		t.Fatal("a second Run returned nil")
	}
	if n := p.closes(); n != 1 {
		t.Errorf("Close was called %d times after a second Run, want once", n)
	}
}
