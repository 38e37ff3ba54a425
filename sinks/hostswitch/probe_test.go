package hostswitch_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// probePeer answers the probe as gvproxy does (GET on the expose path:
// HTTP 400 "post only"), or, while down, hangs up without an answer.
type probePeer struct {
	srv    *httptest.Server
	probes atomic.Int64
	down   atomic.Bool
}

func newProbePeer(t *testing.T) *probePeer {
	p := &probePeer{}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.URL.Path == "/services/forwarder/expose" {
			p.probes.Add(1)
		}
		if p.down.Load() {
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		http.Error(w, "post only", http.StatusBadRequest)
	}))
	t.Cleanup(p.srv.Close)
	return p
}

// waitProbes waits until the peer has seen n probes in all.
func (p *probePeer) waitProbes(t *testing.T, n int64) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, fmt.Sprintf("%d probes", n), func() (bool, string) {
		got := p.probes.Load()
		return got >= n, fmt.Sprintf("%d so far", got)
	})
}

// watch runs s.WatchPeer until the test ends and returns its count of
// checks.
func watch(t *testing.T, s *hostswitch.Sink) *atomic.Int64 {
	var checks atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.WatchPeer(ctx, func() { checks.Add(1) })
	}()
	t.Cleanup(func() { cancel(); <-done })
	return &checks
}

func waitChecks(t *testing.T, checks *atomic.Int64, n int64) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, fmt.Sprintf("%d checks", n), func() (bool, string) {
		got := checks.Load()
		return got == n, fmt.Sprintf("%d so far", got)
	})
}

// TestProbeAsksForACheckWhenTheConnectionIsReplaced: probes answered on the
// same connection ask for nothing; one answered on a new connection (the
// old one was closed, as a restart closes it) asks for one reconcile and
// signals PeerBack; failing probes ask for nothing, and the first answer
// after them asks for one.
func TestProbeAsksForACheckWhenTheConnectionIsReplaced(t *testing.T) {
	peer := newProbePeer(t)
	s, err := hostswitch.New(hostswitch.Config{BaseURL: peer.srv.URL, GuestIP: hostswitch.DefaultGuestIP, ProbeInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	checks := watch(t, s)

	peer.waitProbes(t, 5)
	if n := checks.Load(); n != 0 {
		t.Fatalf("probes answered on one connection asked for %d checks, want 0", n)
	}

	peer.srv.CloseClientConnections()
	waitChecks(t, checks, 1)
	select {
	case <-s.PeerBack():
	default:
		t.Error("a replaced connection did not signal PeerBack")
	}
	peer.waitProbes(t, peer.probes.Load()+5)
	if n := checks.Load(); n != 1 {
		t.Fatalf("after one replaced connection: %d checks, want 1", n)
	}

	peer.down.Store(true)
	peer.waitProbes(t, peer.probes.Load()+5)
	if n := checks.Load(); n != 1 {
		t.Fatalf("while the peer hangs up: %d checks, want still 1", n)
	}
	peer.down.Store(false)
	waitChecks(t, checks, 2)
	select {
	case <-s.PeerBack():
	default:
		t.Error("a peer answering again did not signal PeerBack")
	}
}

// TestFullChecksWaitForTheProbe: with the probe on, the periodic full check
// asks for nothing while the probe has no answer, and runs again once it
// has.
func TestFullChecksWaitForTheProbe(t *testing.T) {
	peer := newProbePeer(t)
	peer.down.Store(true)
	s, err := hostswitch.New(hostswitch.Config{BaseURL: peer.srv.URL, GuestIP: hostswitch.DefaultGuestIP, ProbeInterval: 10 * time.Millisecond, CheckInterval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	checks := watch(t, s)
	peer.waitProbes(t, 10)
	if n := checks.Load(); n != 0 {
		t.Fatalf("full checks of a peer that never answered the probe: %d, want 0", n)
	}
	peer.down.Store(false)
	// The probe's answer after failing asks for one; full checks follow.
	testenv.Eventually(t, 10*time.Second, "full checks again", func() (bool, string) {
		got := checks.Load()
		return got >= 3, fmt.Sprintf("%d so far", got)
	})
}

// TestBrokenConnectionIsProbedAtOnce: with the probe at its longest
// interval, a connection the peer closes (as a restart closes it) is
// probed at once, not at the next tick, and that probe, answered on a new
// connection, asks for a reconcile.
func TestBrokenConnectionIsProbedAtOnce(t *testing.T) {
	peer := newProbePeer(t)
	core, logs := observer.New(zap.DebugLevel)
	s, err := hostswitch.New(hostswitch.Config{BaseURL: peer.srv.URL, GuestIP: hostswitch.DefaultGuestIP,
		ProbeInterval: hostswitch.MaxProbeInterval, Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	checks := watch(t, s)
	peer.waitProbes(t, 1)
	peer.srv.CloseClientConnections()
	waitChecks(t, checks, 1)
	if n := logs.FilterMessageSnippet("connection to host-switch broke").Len(); n != 1 {
		t.Errorf("%d log lines about the broken connection, want 1", n)
	}
	if n := peer.probes.Load(); n != 2 {
		t.Errorf("%d probes, want 2: the first and the one the broken connection brought", n)
	}
}

// TestChecksCostOneRequestAndAskOnlyOnChange: with the probe and the
// check at one interval, each interval costs one request, the list (the
// probe of its turn); the router is asked to reconcile only when the list
// changed or the sink sent something since the reconcile before, and that
// reconcile gets the list just read instead of asking again.
func TestChecksCostOneRequestAndAskOnlyOnChange(t *testing.T) {
	var list atomic.Value
	list.Store(`[]`)
	var lists, probes atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/services/forwarder/all":
			lists.Add(1)
			_, _ = io.WriteString(w, list.Load().(string))
		case r.Method == http.MethodGet:
			probes.Add(1)
			http.Error(w, "post only", http.StatusBadRequest)
		default:
			w.WriteHeader(http.StatusOK)
		}
	}))
	defer srv.Close()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: srv.URL, GuestIP: hostswitch.DefaultGuestIP,
		ProbeInterval: 20 * time.Millisecond, CheckInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	var checks, extra atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.WatchPeer(ctx, func() {
			// As the router does: reconcile, through List, at once.
			checks.Add(1)
			before := lists.Load()
			if _, err := s.List(ctx); err != nil {
				t.Errorf("List: %v", err)
			}
			extra.Add(lists.Load() - before)
		})
	}()
	t.Cleanup(func() { cancel(); <-done })

	waitLists := func(n int64) {
		t.Helper()
		testenv.Eventually(t, 10*time.Second, fmt.Sprintf("%d lists", n), func() (bool, string) {
			return lists.Load() >= n, fmt.Sprintf("%d so far", lists.Load())
		})
	}
	waitLists(20)
	if n := probes.Load(); n != 1 {
		t.Errorf("%d probes besides %d lists, want only the first: a list is the probe of its turn", n, lists.Load())
	}
	if n := checks.Load(); n != 1 {
		t.Errorf("%d checks while the list stayed the same, want the first alone", n)
	}
	list.Store(`[{"local":"127.0.0.1:8080","remote":"192.168.127.2:8080","protocol":"tcp"}]`)
	waitLists(lists.Load() + 10)
	if n := checks.Load(); n != 2 {
		t.Errorf("%d checks after one change of the list, want 2", n)
	}
	if err := s.Send(ctx, core.Change{Mapping: sinktest.Mapping("docker", "c", 8081, 1)}); err != nil {
		t.Fatal(err)
	}
	waitLists(lists.Load() + 10)
	if n := checks.Load(); n != 3 {
		t.Errorf("%d checks after a send, the list the same, want 3", n)
	}
	if n := extra.Load(); n != 0 {
		t.Errorf("the reconciles asked for the list %d more times; want the one just read", n)
	}
}
