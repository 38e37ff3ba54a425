package core_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

// unbindable is a peer that cannot bind host ports from 10000 up (as
// for sockets bound with IP_FREEBIND to an address the host lacks) while
// refusing is set.
type unbindable struct {
	*fakePeer
	refusing atomic.Bool
	refused  atomic.Int64
}

func (u *unbindable) Send(ctx context.Context, c core.Change) error {
	if !c.Remove && u.refusing.Load() && c.Mapping.Ports[0].HostPort >= 10000 {
		u.refused.Add(1)
		return fmt.Errorf("listen %s: cannot assign requested address", entry(c.Mapping.Ports[0]))
	}
	return u.fakePeer.Send(ctx, c)
}

// refuseAll starts a router with a retry budget of rate and burst,
// delivering to an unbindable peer, sets n ports it refuses (from 10000
// up), and returns once each was refused, with the time they were set.
func refuseAll(t *testing.T, n int, rate float64, burst int) (*unbindable, *harness, []uint16, time.Time) {
	t.Helper()
	peer := &unbindable{fakePeer: newFakePeer()}
	peer.refusing.Store(true)
	cfg := fastConfig()
	cfg.RetryRate, cfg.RetryBurst = rate, burst
	h := startRouter(t, cfg, func(r *core.Router) { r.AddSink("p", peer, nil) })
	t.Cleanup(h.stop)
	ports := make([]uint16, n)
	for i := range ports {
		ports[i] = uint16(10000 + i)
	}
	start := time.Now()
	h.r.Emitter("src").Set(mapping("many", ports...))
	testenv.Eventually(t, waitFor, "every port refused once", func() (bool, string) {
		return peer.refused.Load() >= int64(n), fmt.Sprintf("%d refusals", peer.refused.Load())
	})
	return peer, h, ports, start
}

// TestRetriesOfRefusedPortsAreBudgeted has a peer refuse a thousand ports
// with a fast per-port backoff: their retries cost at most the budget's
// burst and rate in all, a new port meanwhile goes out at once, and once
// the peer can bind them, every refused port gets there.
func TestRetriesOfRefusedPortsAreBudgeted(t *testing.T) {
	const n, rate, burst = 1000, 200, 10
	peer, h, ports, start := refuseAll(t, n, rate, burst)
	h.r.Emitter("src").Set(mapping("new", 8080))
	waitState(t, peer.fakePeer, want(mapping("new", 8080)))
	time.Sleep(time.Second)
	refused, elapsed := peer.refused.Load(), time.Since(start)
	// Without the budget each port is retried every 5-20 ms: tens of
	// thousands of refusals in this time.
	if limit := int64(n + burst + rate*elapsed.Seconds() + 1); refused > limit {
		t.Errorf("%d refusals in %v: over the budget's %d (first attempts, burst and %d/s)", refused, elapsed.Round(time.Millisecond), limit, rate)
	}
	t.Logf("%d refusals of %d ports in %v", refused, n, elapsed.Round(time.Millisecond))
	peer.refusing.Store(false)
	all := want(mapping("x", append(ports, 8080)...))
	testenv.Eventually(t, 60*time.Second, "every refused port exposed", func() (bool, string) {
		got := peer.state()
		return len(got) == len(all), fmt.Sprintf("%d of %d exposed", len(got), len(all))
	})
	peer.checkNoViolations(t)
}

// TestARefusedPortThatComesBackIsARetry has a source lose and find its
// refused ports again and again (as a socket dump may): each return is a
// retry, within the budget, not a first attempt on its own.
func TestARefusedPortThatComesBackIsARetry(t *testing.T) {
	const n, rate, burst, rounds = 200, 50, 10, 20
	peer, h, ports, start := refuseAll(t, n, rate, burst)
	out := h.r.Emitter("src")
	for range rounds {
		out.Delete("many")
		time.Sleep(20 * time.Millisecond)
		out.Set(mapping("many", ports...))
		time.Sleep(20 * time.Millisecond)
	}
	refused, elapsed := peer.refused.Load(), time.Since(start)
	if limit := int64(n + burst + rate*elapsed.Seconds() + 1); refused > limit {
		t.Errorf("%d refusals in %v over %d returns of %d ports: over the budget's %d", refused, elapsed.Round(time.Millisecond), rounds, n, limit)
	}
	t.Logf("%d refusals in %v", refused, elapsed.Round(time.Millisecond))
	peer.refusing.Store(false)
	testenv.Eventually(t, 60*time.Second, "every port exposed", func() (bool, string) {
		got := len(peer.state())
		return got == n, fmt.Sprintf("%d of %d", got, n)
	})
}
