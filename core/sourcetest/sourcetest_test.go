package sourcetest_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
)

// fixtureEnv names the fixture TestSourceFixture runs the suite against;
// the tests below set it for a run of this test binary of their own, so
// that they can read the suite's verdict on a source from its output.
const fixtureEnv = "SOURCETEST_FIXTURE"

// fakeBackend holds workloads by name and tells its watchers of changes.
type fakeBackend struct {
	mu       sync.Mutex
	loads    map[string]core.Mapping
	bases    map[string]uint16
	watchers []chan struct{}
}

func (b *fakeBackend) expose(name string, variant int) core.Mapping {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := core.Mapping{Key: core.Key{ID: name}}
	if variant != sourcetest.NoPorts {
		base, ok := b.bases[name]
		if !ok {
			base = 43000 + uint16(len(b.bases))*10
			b.bases[name] = base
		}
		m.Ports = []core.Port{{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: base + uint16(variant)}}
	}
	b.loads[name] = m
	b.notify()
	return m
}

func (b *fakeBackend) unexpose(m core.Mapping) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.loads, m.ID)
	b.notify()
}

// notify wakes every watcher; the caller holds b.mu.
func (b *fakeBackend) notify() {
	for _, w := range b.watchers {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// watch returns the backend's workloads and a channel that receives after
// each change.
func (b *fakeBackend) watch() ([]core.Mapping, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	w := make(chan struct{}, 1)
	b.watchers = append(b.watchers, w)
	return b.list(), w
}

func (b *fakeBackend) snapshot() []core.Mapping {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.list()
}

// list returns the workloads that publish ports; the caller holds b.mu.
func (b *fakeBackend) list() []core.Mapping {
	var out []core.Mapping
	for _, m := range b.loads {
		if len(m.Ports) > 0 {
			out = append(out, m)
		}
	}
	return out
}

var errWatchEnded = errors.New("fake backend: watch ended")

// fakeSource reports the backend's workloads as a snapshot after each
// change. With quits, its Run gives up at the first change.
type fakeSource struct {
	b     *fakeBackend
	quits bool
}

func (s *fakeSource) Run(ctx context.Context, out core.Emitter) error {
	ms, changed := s.b.watch()
	out.Snapshot(ms)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			if s.quits {
				return errWatchEnded
			}
			out.Snapshot(s.b.snapshot())
		}
	}
}

// TestSourceFixture runs the suite against the fixture fixtureEnv names;
// it is skipped without.
func TestSourceFixture(t *testing.T) {
	name := os.Getenv(fixtureEnv)
	if name == "" {
		t.Skip("runs only as the fixture of the tests of the suite, with " + fixtureEnv + " set")
	}
	var quits bool
	switch name {
	case "honest":
	case "quits":
		quits = true
	default:
		t.Fatalf("%s=%q names no fixture", fixtureEnv, name)
	}
	b := &fakeBackend{loads: map[string]core.Mapping{}, bases: map[string]uint16{}}
	sourcetest.Run(t, sourcetest.Harness{
		New:      func(*testing.T) core.Source { return &fakeSource{b: b, quits: quits} },
		Expose:   func(_ *testing.T, name string, variant int) core.Mapping { return b.expose(name, variant) },
		Unexpose: func(_ *testing.T, m core.Mapping) { b.unexpose(m) },
		Repeat: func(*testing.T, core.Mapping) {
			b.mu.Lock()
			defer b.mu.Unlock()
			b.notify()
		},
		// The waits of the honest fake end at once.
		Timeout: 2 * time.Second,
	})
}

// runFixture runs the suite against the named fixture in a run of this
// test binary, and returns its verbose output and whether it passed.
func runFixture(t *testing.T, name string) (string, bool) {
	t.Helper()
	return testenv.RunTestInChild(t, "TestSourceFixture", fixtureEnv+"="+name)
}

// TestFailsASourceWhoseRunGivesUp: a source whose Run returns an error
// while the suite waits fails that check at once, with the error, not
// after the wait's timeout; the checks that build on it are skipped, and
// cancellation, which does not, still runs.
func TestFailsASourceWhoseRunGivesUp(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "quits")
	if ok {
		t.Fatalf("the suite passed a source whose Run gives up:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- PASS: TestSourceFixture/initial_sync",
		"--- FAIL: TestSourceFixture/add",
		"the source's Run returned "+errWatchEnded.Error(),
		"--- SKIP: TestSourceFixture/no_ports",
		`not run: "add" failed before it and left the backend's state unknown`,
		"--- PASS: TestSourceFixture/cancellation",
	)
	if strings.Contains(out, "still waiting") {
		t.Errorf("a wait ran out although Run had returned:\n%s", out)
	}
	if n := strings.Count(out, "--- FAIL: TestSourceFixture/"); n != 1 {
		t.Errorf("%d checks failed, want 1:\n%s", n, out)
	}
}

// TestPassesAnHonestSourceWithoutUpdateOrOutage: a source that keeps the
// contract passes, and the checks its harness cannot drive are skipped
// with what they need.
func TestPassesAnHonestSourceWithoutUpdateOrOutage(t *testing.T) {
	t.Parallel()
	out, ok := runFixture(t, "honest")
	if !ok {
		t.Fatalf("the suite failed an honest source:\n%s", out)
	}
	testenv.WantLines(t, out,
		"--- SKIP: TestSourceFixture/update",
		"needs Harness.Update: the backend cannot change a workload's ports in place",
		"--- SKIP: TestSourceFixture/resync_after_backend_outage",
		"needs Harness.Outage: the suite cannot take the backend down",
		"--- PASS: TestSourceFixture/duplicate",
		"--- PASS: TestSourceFixture/resync_after_agent_restart",
		"--- PASS: TestSourceFixture/cancellation",
	)
	if n := strings.Count(out, "--- SKIP: TestSourceFixture/"); n != 2 {
		t.Errorf("%d checks skipped, want 2:\n%s", n, out)
	}
}
