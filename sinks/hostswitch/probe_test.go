package hostswitch_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

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
