package sourcetest

import (
	"context"
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

// ReportLatency reports the median and 99th percentile of ds, in
// milliseconds, as the benchmark's metrics p50-ms and p99-ms.
func ReportLatency(b *testing.B, ds []time.Duration) {
	b.Helper()
	if len(ds) == 0 {
		b.Fatal("no latency measured")
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	pick := func(q float64) float64 {
		i := int(q*float64(len(s))+0.5) - 1
		return float64(s[min(max(i, 0), len(s)-1)]) / float64(time.Millisecond)
	}
	b.ReportMetric(pick(0.50), "p50-ms")
	b.ReportMetric(pick(0.99), "p99-ms")
	b.ReportMetric(float64(len(s)), "samples")
}
