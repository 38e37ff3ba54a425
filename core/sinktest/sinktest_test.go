package sinktest_test

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
)

// fixtureEnv names the fixture TestSinkFixture runs the suite against;
// the tests below set it for a run of this test binary of their own, so
// that they can read the suite's verdict on a sink from its output.
const fixtureEnv = "SINKTEST_FIXTURE"

// fakePeer holds ports, as "proto ip:port", and can be down.
type fakePeer struct {
	mu   sync.Mutex
	down bool
	held map[string]bool
}

func (p *fakePeer) state(*testing.T) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for e := range p.held {
		out = append(out, e)
	}
	slices.Sort(out)
	return out
}

func (p *fakePeer) setDown(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
}

// fakeSink talks to a fakePeer. Its fields say how it breaks the
// contract; the zero value keeps it.
type fakeSink struct {
	peer *fakePeer
	// whenDown is what Send of c returns while the peer is down; nil: an
	// error marked core.PeerDown.
	whenDown func(c core.Change) error
	// keepsRemoved makes Send of a remove succeed without removing.
	keepsRemoved bool
}

var errRefused = errors.New("fake peer: connection refused")

func (s *fakeSink) Send(ctx context.Context, c core.Change) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.peer.mu.Lock()
	defer s.peer.mu.Unlock()
	if s.peer.down {
		if s.whenDown != nil {
			return s.whenDown(c)
		}
		return core.PeerDown(errRefused)
	}
	for _, p := range c.Mapping.Ports {
		switch {
		case !c.Remove:
			s.peer.held[sinktest.Entry(p)] = true
		case !s.keepsRemoved:
			delete(s.peer.held, sinktest.Entry(p))
		}
	}
	return nil
}

// ipv6Only is a fakeSink whose PortFilter takes IPv6 ports alone.
type ipv6Only struct{ fakeSink }

func (*ipv6Only) Supports(p core.Port) error {
	if !p.HostIP.Is6() {
		return errors.New("fake peer: IPv6 only")
	}
	return nil
}

// fixtures are the sinks TestSinkFixture can run the suite against, by
// name: each returns a new instance talking to p.
var fixtures = map[string]func(p *fakePeer) core.Sink{
	"honest": func(p *fakePeer) core.Sink { return &fakeSink{peer: p} },
	"hides outage": func(p *fakePeer) core.Sink {
		return &fakeSink{peer: p, whenDown: func(core.Change) error { return nil }}
	},
	"unmarked": func(p *fakePeer) core.Sink {
		return &fakeSink{peer: p, whenDown: func(core.Change) error { return errRefused }}
	},
	"keeps removed": func(p *fakePeer) core.Sink { return &fakeSink{peer: p, keepsRemoved: true} },
	"hides removes": func(p *fakePeer) core.Sink {
		return &fakeSink{peer: p, whenDown: func(c core.Change) error {
			if c.Remove {
				return nil
			}
			return core.PeerDown(errRefused)
		}}
	},
	"ipv6 only": func(p *fakePeer) core.Sink { return &ipv6Only{fakeSink{peer: p}} },
}

// TestSinkFixture runs the suite against the fixture fixtureEnv names, an
// in-memory sink (without any optional interface but ipv6Only's
// PortFilter); it is skipped without.
func TestSinkFixture(t *testing.T) {
	name := os.Getenv(fixtureEnv)
	if name == "" {
		t.Skip("runs only as the fixture of the tests of the suite, with " + fixtureEnv + " set")
	}
	newSink, ok := fixtures[name]
	if !ok {
		t.Fatalf("%s=%q names no fixture", fixtureEnv, name)
	}
	peer := &fakePeer{held: map[string]bool{}}
	sinktest.Run(t, sinktest.Harness{
		New:   func(*testing.T) core.Sink { return newSink(peer) },
		State: peer.state,
		Restart: func(*testing.T) {
			peer.mu.Lock()
			defer peer.mu.Unlock()
			clear(peer.held)
		},
		Outage: func(_ *testing.T, during func()) {
			peer.setDown(true)
			during()
			peer.setDown(false)
		},
		// The waits of an honest fake end at once; a broken one fails
		// them, and the suite's verdict comes after this long.
		Timeout: 2 * time.Second,
	})
}

// runFixture runs the suite against the named fixture in a run of this
// test binary, and returns its verbose output and whether it passed.
func runFixture(t *testing.T, name string) (string, bool) {
	t.Helper()
	return testenv.RunTestInChild(t, "TestSinkFixture", fixtureEnv+"="+name)
}

// TestFailsASinkThatHidesAnOutage: a sink whose Send returns nil while
// its peer is down fails the outage check, which says why, and only that
// check: the other checks pass.
func TestFailsASinkThatHidesAnOutage(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "hides outage")
	if ok {
		t.Fatalf("the suite passed a sink that hides an outage:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- FAIL: TestSinkFixture/changes_while_peer_is_down",
		"Send returned nil while the peer was down: a sink must report an unreachable peer with core.PeerDown",
		"--- PASS: TestSinkFixture/update",
		"--- PASS: TestSinkFixture/cancellation",
	)
	if n := strings.Count(out, "--- FAIL: TestSinkFixture/"); n != 1 {
		t.Errorf("%d checks failed, want 1:\n%s", n, out)
	}
}

// TestFailsASinkThatHidesAnOutageFromTheRouter: a sink that reports an
// outage to an add but not to a remove is caught by what the router's
// instance returned: the add from a new instance does not tell.
func TestFailsASinkThatHidesAnOutageFromTheRouter(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "hides removes")
	if ok {
		t.Fatalf("the suite passed a sink that hides an outage from removes:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- FAIL: TestSinkFixture/changes_while_peer_is_down",
		"Send returned nil while the peer was down: a sink must report an unreachable peer with core.PeerDown (the router's Send of remove tcp 127.0.0.1:1100",
	)
	if n := strings.Count(out, "--- FAIL: TestSinkFixture/"); n != 1 {
		t.Errorf("%d checks failed, want 1:\n%s", n, out)
	}
}

// TestFailsASinkThatDoesNotMarkAnOutage: a sink that fails while its peer
// is down, but with an error not marked core.PeerDown, fails the outage
// check, which says so; the router would retry each port on its own and
// never replay the state.
func TestFailsASinkThatDoesNotMarkAnOutage(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "unmarked")
	if ok {
		t.Fatalf("the suite passed a sink that does not mark an outage:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- FAIL: TestSinkFixture/changes_while_peer_is_down",
		"Send failed while the peer was down with an error not marked core.PeerDown",
		errRefused.Error(),
	)
	if n := strings.Count(out, "--- FAIL: TestSinkFixture/"); n != 1 {
		t.Errorf("%d checks failed, want 1:\n%s", n, out)
	}
}

// TestStopsAtTheFirstFailure: a sink that keeps removed ports fails the
// remove check once, and the checks that build on the state it left are
// skipped rather than failed after their own timeouts; cancellation, which
// does not, still runs.
func TestStopsAtTheFirstFailure(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "keeps removed")
	if ok {
		t.Fatalf("the suite passed a sink that keeps removed ports:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- PASS: TestSinkFixture/add",
		"--- FAIL: TestSinkFixture/remove ",
		"--- SKIP: TestSinkFixture/remove_unknown",
		"--- SKIP: TestSinkFixture/update",
		"--- SKIP: TestSinkFixture/changes_while_peer_is_down",
		`not run: "remove" failed before it and left the peer's state unknown`,
		"--- PASS: TestSinkFixture/cancellation",
	)
	if n := strings.Count(out, "still waiting"); n != 1 {
		t.Errorf("%d waits failed, want 1 (the remove check's):\n%s", n, out)
	}
}

// TestPassesAnHonestSinkWithoutPeerWatcher: a sink that keeps the
// contract but implements no optional interface passes, and the check it
// cannot take is skipped with what it needs.
func TestPassesAnHonestSinkWithoutPeerWatcher(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "honest")
	if !ok {
		t.Fatalf("the suite failed an honest sink:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- SKIP: TestSinkFixture/resync_after_peer_restart",
		"needs core.PeerWatcher: without it the router only notices a restarted peer at its next change",
		"--- PASS: TestSinkFixture/changes_while_peer_is_down",
		"--- PASS: TestSinkFixture/update",
	)
	if n := strings.Count(out, "--- SKIP: TestSinkFixture/"); n != 1 {
		t.Errorf("%d checks skipped, want 1:\n%s", n, out)
	}
}

// TestSkipsWhatAPortFilterRefuses: a sink whose PortFilter refuses the
// suite's ports is not failed for not exposing them: every check is
// skipped, saying which port the filter refuses and why.
func TestSkipsWhatAPortFilterRefuses(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "ipv6 only")
	if !ok {
		t.Fatalf("the suite failed a sink that refuses its ports:\n%s", out)
	}
	testenv.WantLines(t, out, "needs its ports taken: the sink's core.PortFilter refuses tcp 127.0.0.1:11001")
	if n, want := strings.Count(out, "--- SKIP: TestSinkFixture/"), 8; n != want {
		t.Errorf("%d checks skipped, want all %d:\n%s", n, want, out)
	}
}
