package hostswitch_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

// startProbedRouter runs a router delivering to a host-switch sink on url
// with the default probe and the periodic full check off, so that only the
// probe can tell it about a restart. It returns the router and the log
// lines of the sink and router.
func startProbedRouter(t testing.TB, url string, cfg core.RouterConfig, dial func(context.Context, string, string) (net.Conn, error)) (*core.Router, *observer.ObservedLogs) {
	t.Helper()
	obs, logs := observer.New(zap.InfoLevel)
	log := zap.New(obs)
	s, err := hostswitch.New(hostswitch.Config{
		BaseURL:       url,
		GuestIP:       hostswitch.DefaultGuestIP,
		ProbeInterval: hostswitch.DefaultProbeInterval,
		CheckInterval: time.Hour,
		Log:           log,
		Dial:          dial,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	cfg.Log = log
	r := core.NewRouter(cfg)
	r.AddSink(hostswitch.Name, s, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = r.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return r, logs
}

func sinkStatus(t testing.TB, r *core.Router) core.SinkStatus {
	t.Helper()
	for _, s := range r.Status().Sinks {
		if s.Name == hostswitch.Name {
			return s
		}
	}
	t.Fatalf("no %s in the router's status", hostswitch.Name)
	return core.SinkStatus{}
}

// probeNoticed counts the sink's log lines that say the probe found
// host-switch restarted or back.
func probeNoticed(logs *observer.ObservedLogs) int {
	return logs.FilterMessageSnippet("restoring its forwards").Len()
}

// TestRestartIsNoticedByTheProbe restarts gvproxy on the same address, with
// only its static forwards: the probe notices, a reconcile runs and the
// agent's forwards come back, though the periodic full check is off.
func TestRestartIsNoticedByTheProbe(t *testing.T) {
	g := gvproxytest.Start(t)
	r, logs := startProbedRouter(t, g.URL(), core.RouterConfig{SyncGrace: 100 * time.Millisecond}, nil)
	ports := []int{testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)}
	r.Emitter("docker").Set(loopbackPorts("a", ports...))
	waitForwards(t, g, tcpLocal(ports...))
	for round := range 2 {
		syncs, noticed := sinkStatus(t, r).Syncs, probeNoticed(logs)
		g.Stop()
		g.Start()
		waitForwards(t, g, tcpLocal(ports...))
		if got := probeNoticed(logs); got <= noticed {
			t.Errorf("restart %d: the probe logged nothing about it (log: %v)", round, messages(logs))
		}
		if got := sinkStatus(t, r).Syncs; got <= syncs {
			t.Errorf("restart %d: %d reconciles before, %d after; want one more", round, syncs, got)
		}
	}
	checkStaticKept(t, g)
}

// TestPeerBackEndsTheBackoff changes a mapping while gvproxy is down, so
// that the router finds the peer unreachable and waits out its backoff (an
// hour here): the probe's word that gvproxy is back ends the wait, and both
// the old forwards and the new one are there.
func TestPeerBackEndsTheBackoff(t *testing.T) {
	g := gvproxytest.Start(t)
	r, logs := startProbedRouter(t, g.URL(), core.RouterConfig{
		SyncGrace: 100 * time.Millisecond,
		Backoff:   core.Backoff{Initial: time.Hour, Max: time.Hour},
	}, nil)
	p1, p2, p3 := testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)
	out := r.Emitter("docker")
	out.Set(loopbackPorts("a", p1, p2))
	waitForwards(t, g, tcpLocal(p1, p2))

	g.Stop()
	out.Set(loopbackPorts("b", p3))
	testenv.Eventually(t, 10*time.Second, "the router to find gvproxy down", func() (bool, string) {
		s := sinkStatus(t, r)
		return s.PeerDown, fmt.Sprintf("%+v", s)
	})
	g.Start()
	waitForwards(t, g, tcpLocal(p1, p2, p3))
	if logs.FilterMessageSnippet("before the backoff ends").Len() == 0 {
		t.Errorf("the router did not say it cut its backoff short (log: %v)", messages(logs))
	}
}

// checkStaticKept fails t when one of gvproxy's own forwards is missing.
func checkStaticKept(t *testing.T, g *gvproxytest.Gvproxy) {
	t.Helper()
	got := forwards(t, g)
	for _, f := range staticForwards(g) {
		if !slices.Contains(got, f) {
			t.Errorf("gvproxy's own forward %q is gone (have %q)", f, got)
		}
	}
}

func messages(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		out = append(out, e.Message)
	}
	return out
}
