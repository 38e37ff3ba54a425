// Package sourcetest is the contract suite every source passes. A source's
// own test supplies a Harness that drives its backend (a real engine, a
// file, a fake clientset) and calls Run.
package sourcetest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/guestagent/guestagent/core"
)

// NoPorts asks Harness.Expose for a workload that publishes no ports.
const NoPorts = -1

// Harness tells the suite how to drive one source's backend.
type Harness struct {
	// New returns a new instance of the source under test, as after an
	// agent restart. It must be connected to the same backend every time.
	New func(t *testing.T) core.Source
	// Expose makes the backend publish a workload called name, with the
	// port set numbered variant (0 or 1; NoPorts for none), and returns the
	// mapping the source should report for it. Different names and variants
	// must not share host ports.
	Expose func(t *testing.T, name string, variant int) core.Mapping
	// Unexpose makes the backend withdraw the workload behind m.
	Unexpose func(t *testing.T, m core.Mapping)
	// Update, if set, switches a running workload to port set variant in
	// place and returns the new expected mapping.
	Update func(t *testing.T, m core.Mapping, variant int) core.Mapping
	// Repeat, if set, makes the backend announce m again unchanged (a
	// duplicate start event, a rewritten file).
	Repeat func(t *testing.T, m core.Mapping)
	// Outage, if set, takes the backend down, calls during, then brings the
	// backend back (an engine restart).
	Outage func(t *testing.T, during func())
	// Timeout bounds every wait for the source to report (default 30s).
	Timeout time.Duration
}

// Run runs the contract suite against h. The subtests share one backend and
// run in order.
func Run(t *testing.T, h Harness) {
	t.Helper()
	if h.New == nil || h.Expose == nil || h.Unexpose == nil {
		t.Fatal("sourcetest: Harness needs New, Expose and Unexpose")
	}
	if h.Timeout <= 0 {
		h.Timeout = 30 * time.Second
	}
	s := newSuite(t, h)
	defer s.stop()

	a := h.Expose(t, "a", 0)
	s.start()
	t.Run("initial sync", func(t *testing.T) { s.waitMapping(t, a) })
	t.Run("add", func(t *testing.T) {
		b := h.Expose(t, "b", 0)
		s.waitMapping(t, b)
		h.Unexpose(t, b)
		s.waitGone(t, b.Key)
	})
	t.Run("no ports", func(t *testing.T) {
		n := h.Expose(t, "noports", NoPorts)
		c := h.Expose(t, "c", 0)
		s.waitMapping(t, c)
		h.Unexpose(t, n)
		h.Unexpose(t, c)
		s.waitGone(t, c.Key)
		if got := s.sink.changesFor(n.Key); len(got) != 0 {
			t.Errorf("a workload without ports produced changes: %v", got)
		}
	})
	t.Run("update", func(t *testing.T) {
		if h.Update == nil {
			t.Skip("backend cannot change ports in place")
		}
		before := len(s.sink.changesFor(a.Key))
		a2 := h.Update(t, a, 1)
		s.waitMapping(t, a2)
		changes := s.sink.changesFor(a.Key)[before:]
		if len(changes) == 0 || !changes[0].Remove {
			t.Errorf("update must remove what went before adding what came; got %v", changes)
		}
		a = a2
	})
	t.Run("duplicate", func(t *testing.T) {
		if h.Repeat == nil {
			t.Skip("backend cannot repeat an announcement")
		}
		before := len(s.sink.changesFor(a.Key))
		h.Repeat(t, a)
		marker := h.Expose(t, "marker", 0)
		s.waitMapping(t, marker)
		if got := s.sink.changesFor(a.Key)[before:]; len(got) != 0 {
			t.Errorf("repeated announcement produced changes: %v", got)
		}
		h.Unexpose(t, marker)
		s.waitGone(t, marker.Key)
	})
	t.Run("resync after agent restart", func(t *testing.T) {
		s.restart(t, func() {
			h.Unexpose(t, a)
			a = h.Expose(t, "d", 0)
		})
		s.waitExactly(t, a)
	})
	t.Run("resync after backend outage", func(t *testing.T) {
		if h.Outage == nil {
			t.Skip("backend cannot be restarted by the harness")
		}
		var e core.Mapping
		h.Outage(t, func() {
			h.Unexpose(t, a)
			e = h.Expose(t, "e", 1)
		})
		a = e
		s.waitExactly(t, a)
	})
	t.Run("cancellation", func(t *testing.T) {
		s.stopSource(t)
		ignore := goleak.IgnoreCurrent()
		src := h.New(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- src.Run(ctx, s.router.Emitter("probe")) }()
		waitFor(t, h.Timeout, func() (bool, string) {
			n := len(s.router.Desired())
			return slices.ContainsFunc(s.router.Desired(), func(m core.Mapping) bool { return m.Source == "probe" }),
				fmt.Sprintf("probe instance never reported (%d mappings known)", n)
		})
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run after cancel returned %v, want nil", err)
			}
		case <-time.After(h.Timeout):
			t.Fatalf("Run did not return within %s of cancellation", h.Timeout)
		}
		if err := goleak.Find(ignore); err != nil {
			t.Errorf("goroutines left behind after Run returned: %v", err)
		}
	})
	h.Unexpose(t, a)
}

type suite struct {
	t      *testing.T
	h      Harness
	router *core.Router
	sink   *recordingSink
	stopR  context.CancelFunc
	rDone  chan struct{}

	cancelSrc context.CancelFunc
	srcDone   chan error
}

const sourceName = "under-test"

func newSuite(t *testing.T, h Harness) *suite {
	s := &suite{t: t, h: h, sink: newRecordingSink(), rDone: make(chan struct{})}
	s.router = core.NewRouter(core.RouterConfig{})
	s.router.AddSink("record", s.sink, nil)
	ctx, cancel := context.WithCancel(context.Background())
	s.stopR = cancel
	go func() {
		defer close(s.rDone)
		_ = s.router.Run(ctx)
	}()
	return s
}

func (s *suite) start() {
	src := s.h.New(s.t)
	ctx, cancel := context.WithCancel(context.Background())
	s.cancelSrc = cancel
	s.srcDone = make(chan error, 1)
	go func() { s.srcDone <- src.Run(ctx, s.router.Emitter(sourceName)) }()
}

func (s *suite) stopSource(t *testing.T) {
	if s.cancelSrc == nil {
		return
	}
	s.cancelSrc()
	select {
	case err := <-s.srcDone:
		if err != nil {
			t.Errorf("Run returned %v after cancellation, want nil", err)
		}
	case <-time.After(s.h.Timeout):
		t.Fatalf("Run did not return within %s of cancellation", s.h.Timeout)
	}
	s.cancelSrc = nil
}

func (s *suite) restart(t *testing.T, whileDown func()) {
	s.stopSource(t)
	whileDown()
	s.start()
}

func (s *suite) stop() {
	if s.cancelSrc != nil {
		s.cancelSrc()
		<-s.srcDone
	}
	s.stopR()
	<-s.rDone
}

func (s *suite) waitMapping(t *testing.T, want core.Mapping) {
	t.Helper()
	want = expected(want)
	waitFor(t, s.h.Timeout, func() (bool, string) {
		got, ok := s.sink.state(want.Key)
		return ok && got.Equal(want), fmt.Sprintf("sink has %v for %s, want %v", got, want.Key, want)
	})
}

func (s *suite) waitGone(t *testing.T, k core.Key) {
	t.Helper()
	k.Source = sourceName
	waitFor(t, s.h.Timeout, func() (bool, string) {
		got, ok := s.sink.state(k)
		return !ok, fmt.Sprintf("sink still has %v", got)
	})
}

// waitExactly waits until the source's only mapping is want.
func (s *suite) waitExactly(t *testing.T, want core.Mapping) {
	t.Helper()
	want = expected(want)
	waitFor(t, s.h.Timeout, func() (bool, string) {
		all := s.sink.all(sourceName)
		return len(all) == 1 && all[0].Equal(want), fmt.Sprintf("sink has %v, want only %v", all, want)
	})
}

func expected(m core.Mapping) core.Mapping {
	m.Source = sourceName
	return m.Normalize()
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, msg := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// recordingSink applies changes to an in-memory peer and keeps their log,
// by the key of the claim each change names.
type recordingSink struct {
	mu      sync.Mutex
	peer    map[core.Key]core.Mapping
	changes map[core.Key][]core.Change
}

func newRecordingSink() *recordingSink {
	return &recordingSink{peer: map[core.Key]core.Mapping{}, changes: map[core.Key][]core.Change{}}
}

func (r *recordingSink) Send(_ context.Context, c core.Change) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := c.Mapping.Key
	r.changes[k] = append(r.changes[k], c)
	m := r.peer[k]
	m.Key = k
	if c.Remove {
		m.Ports = slices.DeleteFunc(m.Ports, func(p core.Port) bool { return slices.Contains(c.Mapping.Ports, p) })
	} else {
		m.Ports = append(m.Ports, c.Mapping.Ports...)
		m.ConnectAddrs = c.Mapping.ConnectAddrs
	}
	m = m.Normalize()
	if len(m.Ports) == 0 {
		delete(r.peer, k)
	} else {
		r.peer[k] = m
	}
	return nil
}

func (r *recordingSink) state(k core.Key) (core.Mapping, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m, ok := r.peer[k]
	return m.Normalize(), ok // a copy: Send changes the stored one in place
}

func (r *recordingSink) all(source string) []core.Mapping {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []core.Mapping
	for k, m := range r.peer {
		if k.Source == source {
			out = append(out, m.Normalize())
		}
	}
	slices.SortFunc(out, func(a, b core.Mapping) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func (r *recordingSink) changesFor(k core.Key) []core.Change {
	k.Source = sourceName
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.changes[k])
}

// Start runs src under name into a new Router (with no sinks) until the
// test ends, and returns the Router, whose Desired shows what src reports.
// The test fails if Run returns an error.
func Start(t testing.TB, name string, src core.Source) *core.Router {
	t.Helper()
	r := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r.Emitter(name)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: Run returned %v", name, err)
		}
	})
	return r
}
