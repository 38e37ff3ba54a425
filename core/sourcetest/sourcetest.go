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
	"github.com/guestagent/guestagent/internal/testenv"
)

// checks is the contract, in the order Run runs it on one backend. Before
// the first, the backend publishes workload "a" and the source starts; each
// check leaves the source running (but the last) and suite.a exposed, as
// the next expects. A check whose Harness function is nil is skipped with
// the reason; once a check fails, the later ones that build on the state
// it left are skipped. No check needs an optional interface of the source
// (core.Noter, core.Describer).
var checks = []check{
	{name: "initial sync", run: checkInitialSync},
	{name: "add", run: checkAdd},
	{name: "no ports", run: checkNoPorts},
	{name: "update", needs: []need{needUpdate}, run: checkUpdate},
	{name: "duplicate", needs: []need{needRepeat}, run: checkDuplicate},
	{name: "resync after agent restart", run: checkResyncAfterAgentRestart},
	{name: "resync after backend outage", needs: []need{needOutage}, run: checkResyncAfterBackendOutage},
	{name: "cancellation", alone: true, run: checkCancellation},
}

// check is one named part of the contract.
type check struct {
	name  string
	needs []need
	alone bool // does not build on the state the checks before it left
	run   func(*testing.T, *suite)
}

// need is a Harness function a check cannot do without.
type need struct {
	what string // the Harness field
	why  string // what the check cannot do without it
	has  func(Harness) bool
}

// The needs of checks.
var (
	needUpdate = need{"Harness.Update", "the backend cannot change a workload's ports in place",
		func(h Harness) bool { return h.Update != nil }}
	needRepeat = need{"Harness.Repeat", "the backend cannot announce a workload again",
		func(h Harness) bool { return h.Repeat != nil }}
	needOutage = need{"Harness.Outage", "the suite cannot take the backend down",
		func(h Harness) bool { return h.Outage != nil }}
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

// Run runs the contract suite against h: every check, as a subtest named
// for it, in order. The subtests share one backend. A check stops at its
// first failure.
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

	s.a = h.Expose(t, "a", 0)
	s.start()
	var failed string // the first check that failed
	for _, c := range checks {
		ok := t.Run(c.name, func(t *testing.T) {
			if failed != "" && !c.alone {
				t.Skipf("not run: %q failed before it and left the backend's state unknown", failed)
			}
			for _, n := range c.needs {
				if !n.has(h) {
					t.Skipf("needs %s: %s", n.what, n.why)
				}
			}
			c.run(t, s)
		})
		if !ok && failed == "" {
			failed = c.name
		}
	}
	h.Unexpose(t, s.a)
}

// checkInitialSync: a workload that was there before the source started is
// reported.
func checkInitialSync(t *testing.T, s *suite) { s.waitMapping(t, s.a) }

// checkAdd: a workload that appears while the source runs is reported, and
// it goes when the workload is withdrawn.
func checkAdd(t *testing.T, s *suite) {
	b := s.h.Expose(t, "b", 0)
	s.waitMapping(t, b)
	s.h.Unexpose(t, b)
	s.waitGone(t, b.Key)
}

// checkNoPorts: a workload that publishes no ports produces no change at
// all, neither when it comes nor when it goes.
func checkNoPorts(t *testing.T, s *suite) {
	n := s.h.Expose(t, "noports", NoPorts)
	c := s.h.Expose(t, "c", 0)
	s.waitMapping(t, c)
	s.h.Unexpose(t, n)
	s.h.Unexpose(t, c)
	s.waitGone(t, c.Key)
	if got := s.sink.changesFor(n.Key); len(got) != 0 {
		t.Fatalf("a workload without ports produced changes: %v", got)
	}
}

// checkUpdate: a workload whose ports change in place is reported with the
// new ports, and the old ones are removed before the new ones are added.
func checkUpdate(t *testing.T, s *suite) {
	before := len(s.sink.changesFor(s.a.Key))
	a2 := s.h.Update(t, s.a, 1)
	s.waitMapping(t, a2)
	changes := s.sink.changesFor(s.a.Key)[before:]
	if len(changes) == 0 || !changes[0].Remove {
		s.a = a2
		t.Fatalf("update must remove what went before adding what came; got %v", changes)
	}
	s.a = a2
}

// checkDuplicate: the backend announcing a workload again unchanged
// produces no change; a marker workload exposed after it shows the source
// has caught up.
func checkDuplicate(t *testing.T, s *suite) {
	before := len(s.sink.changesFor(s.a.Key))
	s.h.Repeat(t, s.a)
	marker := s.h.Expose(t, "marker", 0)
	s.waitMapping(t, marker)
	got := s.sink.changesFor(s.a.Key)[before:]
	s.h.Unexpose(t, marker)
	s.waitGone(t, marker.Key)
	if len(got) != 0 {
		t.Fatalf("repeated announcement produced changes: %v", got)
	}
}

// checkResyncAfterAgentRestart: a new instance of the source, started
// after workloads came and went while none ran, reports exactly what the
// backend has now: its first snapshot drops what went meanwhile.
func checkResyncAfterAgentRestart(t *testing.T, s *suite) {
	s.restart(t, func() {
		s.h.Unexpose(t, s.a)
		s.a = s.h.Expose(t, "d", 0)
	})
	s.waitExactly(t, s.a)
}

// checkResyncAfterBackendOutage: the running source recovers from its
// backend going down, and then reports exactly what the backend has, though
// workloads came and went during the outage.
func checkResyncAfterBackendOutage(t *testing.T, s *suite) {
	var e core.Mapping
	s.h.Outage(t, func() {
		s.h.Unexpose(t, s.a)
		e = s.h.Expose(t, "e", 1)
	})
	s.a = e
	s.waitExactly(t, s.a)
}

// checkCancellation: Run returns nil soon after its context is cancelled,
// and leaves no goroutine behind.
func checkCancellation(t *testing.T, s *suite) {
	s.stopSource(t)
	ignore := goleak.IgnoreCurrent()
	src := s.h.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, s.router.Emitter("probe")) }()
	testenv.Eventually(t, s.h.Timeout, "the probe instance to report", func() (bool, string) {
		n := len(s.router.Desired())
		return slices.ContainsFunc(s.router.Desired(), func(m core.Mapping) bool { return m.Source == "probe" }),
			fmt.Sprintf("it never reported (%d mappings known)", n)
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after cancel returned %v, want nil", err)
		}
	case <-time.After(s.h.Timeout):
		t.Fatalf("Run did not return within %s of cancellation", s.h.Timeout)
	}
	if err := goleak.Find(ignore); err != nil {
		t.Fatalf("goroutines left behind after Run returned: %v", err)
	}
}

// suite is the state the checks share: one router with a recording sink,
// the source instance running into it, and the workload carried from check
// to check.
type suite struct {
	t      *testing.T
	h      Harness
	router *core.Router
	sink   *recordingSink
	stopR  context.CancelFunc
	rDone  chan struct{}

	src *instance // the instance running into the router; nil while none

	// a is the workload every check may rely on: exposed before the first,
	// replaced by those that update, restart or take the backend down, and
	// withdrawn after the last.
	a core.Mapping
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

// instance is one running instance of the source.
type instance struct {
	cancel context.CancelFunc
	done   chan struct{} // closed when Run has returned
	err    error         // what Run returned, once done is closed
}

// start runs a new instance of the source into the router.
func (s *suite) start() {
	src := s.h.New(s.t)
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{cancel: cancel, done: make(chan struct{})}
	s.src = in
	go func() {
		defer close(in.done)
		in.err = src.Run(ctx, s.router.Emitter(sourceName))
	}()
}

// stopSource cancels the running instance, if any, and fails t unless its
// Run returns nil within the timeout.
func (s *suite) stopSource(t *testing.T) {
	in := s.src
	if in == nil {
		return
	}
	s.src = nil
	in.cancel()
	select {
	case <-in.done:
		if in.err != nil {
			t.Fatalf("Run returned %v after cancellation, want nil", in.err)
		}
	case <-time.After(s.h.Timeout):
		t.Fatalf("Run did not return within %s of cancellation", s.h.Timeout)
	}
}

// restart stops the instance, calls whileDown, and starts a new one.
func (s *suite) restart(t *testing.T, whileDown func()) {
	s.stopSource(t)
	whileDown()
	s.start()
}

// stop stops the instance and the router.
func (s *suite) stop() {
	if s.src != nil {
		s.src.cancel()
		<-s.src.done
	}
	s.stopR()
	<-s.rDone
}

// wait waits until cond holds, as testenv.Eventually does, and fails t at
// once, with its error, if the running instance's Run returns meanwhile:
// nothing in the suite would start it again.
func (s *suite) wait(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	in := s.src
	testenv.Eventually(t, s.h.Timeout, what, func() (bool, string) {
		ok, detail := cond()
		if ok || in == nil {
			return ok, detail
		}
		select {
		case <-in.done:
			s.src = nil // gone, and its error told here
			t.Fatalf("the source's Run returned %v, before its context was done, while the suite waited for %s (%s)", in.err, what, detail)
		default:
		}
		return ok, detail
	})
}

// waitMapping waits until the sink holds want, as the source reports it.
func (s *suite) waitMapping(t *testing.T, want core.Mapping) {
	t.Helper()
	want = expected(want)
	s.wait(t, fmt.Sprintf("the sink to have %v for %s", want, want.Key), func() (bool, string) {
		got, ok := s.sink.state(want.Key)
		return ok && got.Equal(want), fmt.Sprintf("it has %v", got)
	})
}

// waitGone waits until the sink holds nothing for k.
func (s *suite) waitGone(t *testing.T, k core.Key) {
	t.Helper()
	k.Source = sourceName
	s.wait(t, fmt.Sprintf("%s to go from the sink", k), func() (bool, string) {
		got, ok := s.sink.state(k)
		return !ok, fmt.Sprintf("it still has %v", got)
	})
}

// waitExactly waits until the source's only mapping is want.
func (s *suite) waitExactly(t *testing.T, want core.Mapping) {
	t.Helper()
	want = expected(want)
	s.wait(t, fmt.Sprintf("the sink to have only %v", want), func() (bool, string) {
		all := s.sink.all(sourceName)
		return len(all) == 1 && all[0].Equal(want), fmt.Sprintf("it has %v", all)
	})
}

// expected is m as the sink receives it from the source under test.
func expected(m core.Mapping) core.Mapping {
	m.Source = sourceName
	return m.Normalize()
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
