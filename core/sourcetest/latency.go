package sourcetest

import (
	"context"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
)

// Arrivals is a sink that notes when each host port first arrives in an
// add, for delivery-latency benchmarks.
type Arrivals struct {
	mu   sync.Mutex
	at   map[uint16]time.Time
	wake chan struct{}
}

// Send records the arrival time of every port c adds.
func (a *Arrivals) Send(_ context.Context, c core.Change) error {
	if c.Remove {
		return nil
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range c.Mapping.Ports {
		if _, ok := a.at[p.HostPort]; !ok {
			a.at[p.HostPort] = now
		}
	}
	close(a.wake)
	a.wake = make(chan struct{})
	return nil
}

// Wait returns when hostPort arrived, waiting at most timeout for it.
func (a *Arrivals) Wait(tb testing.TB, hostPort uint16, timeout time.Duration) time.Time {
	tb.Helper()
	deadline := time.After(timeout)
	for {
		a.mu.Lock()
		at, ok := a.at[hostPort]
		wake := a.wake
		a.mu.Unlock()
		if ok {
			return at
		}
		select {
		case <-wake:
		case <-deadline:
			tb.Fatalf("host port %d was not delivered within %v", hostPort, timeout)
		}
	}
}

// Deliver runs src under name into a Router whose only sink is the
// returned Arrivals, until tb ends.
func Deliver(tb testing.TB, name string, src core.Source) *Arrivals {
	tb.Helper()
	a := &Arrivals{at: map[uint16]time.Time{}, wake: make(chan struct{})}
	r := core.NewRouter(core.RouterConfig{})
	r.AddSource(name, src)
	r.AddSink("arrivals", a, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	tb.Cleanup(func() { cancel(); <-done })
	return a
}

// LatencySamples is how many changes one latency measurement makes: enough
// for a 99th percentile that is not the maximum.
const LatencySamples = 200

// MeasureLatency makes LatencySamples changes per benchmark iteration, one
// at a time, and reports the delivery-latency percentiles. publish makes
// the engine publish a new host port (i counts from 1) and returns the port
// and the moment the change happened (the engine's own event stamp, where
// it has one); the latency runs until a has the port.
func MeasureLatency(b *testing.B, a *Arrivals, publish func(i int) (port uint16, at time.Time)) {
	b.Helper()
	var lat []time.Duration
	i := 0
	for b.Loop() {
		for range LatencySamples {
			i++
			port, at := publish(i)
			lat = append(lat, a.Wait(b, port, 30*time.Second).Sub(at))
		}
	}
	if len(lat) == 0 {
		b.Fatal("no latency measured")
	}
	b.ReportMetric(ms(Percentile(lat, 0.50)), "p50-ms")
	b.ReportMetric(ms(Percentile(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(slices.Max(lat)), "max-ms")
	b.ReportMetric(float64(len(lat)), "samples")
}

// Percentile returns the q-quantile (0 < q <= 1) of ds by the nearest-rank
// method; ds must not be empty.
func Percentile(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
