package sockets_test

import (
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sources/sockets"
)

// BenchmarkDeliveryLatency measures, in a private namespace, the time from
// the helper being told to listen on a new port to the delivery of that
// port to a sink, on the periodic dump path: up to one interval until a
// dump sees the socket, then the settle time. Listeners open at a random
// point of the interval.
func BenchmarkDeliveryLatency(b *testing.B) {
	for _, c := range []struct{ interval, settle time.Duration }{
		{sockets.DefaultInterval, sockets.DefaultSettle},
		{100 * time.Millisecond, sockets.DefaultSettle},
	} {
		b.Run(fmt.Sprintf("interval=%s,settle=%s", c.interval, c.settle), func(b *testing.B) {
			r := newRig(b)
			arrivals := sourcetest.Deliver(b, sockets.Name, r.source(b, c.interval, c.settle, nil))
			sourcetest.MeasureLatency(b, arrivals, func(int) (uint16, time.Time) {
				// A listener opens at any moment of the interval, not just
				// after the dump that delivered the previous one.
				time.Sleep(rand.N(c.interval))
				port := r.nextPort()
				start := time.Now()
				r.h.do(b, "listen tcp 0.0.0.0:%d", port)
				return uint16(port), start
			})
		})
	}
}

// BenchmarkIdleScans measures the agent's CPU time per dump, and so at the
// default interval, with 1,000 listeners open that never change: the
// source dumps every 50ms for the benchmark's time.
func BenchmarkIdleScans(b *testing.B) {
	const n, interval = 1000, 50 * time.Millisecond
	r := newRig(b)
	r.h.do(b, "range tcp 127.0.0.1 30000 %d", n)
	router := sourcetest.Start(b, sockets.Name, r.source(b, interval, 50*time.Millisecond, nil))
	testenv.Eventually(b, waitTimeout, fmt.Sprintf("%d mappings", n), func() (bool, string) {
		got := len(router.Desired())
		return got == n, fmt.Sprintf("have %d", got)
	})
	var cpu time.Duration
	var wall time.Duration
	for b.Loop() {
		before, start := cpuTime(b), time.Now()
		time.Sleep(2 * time.Second)
		cpu += cpuTime(b) - before
		wall += time.Since(start)
	}
	scans := float64(wall) / float64(interval)
	perScan := float64(cpu) / scans / float64(time.Millisecond)
	b.ReportMetric(perScan, "cpu-ms/scan")
	b.ReportMetric(perScan/float64(sockets.DefaultInterval/time.Millisecond)*100, "core-%-at-1s")
}

func cpuTime(tb testing.TB) time.Duration {
	tb.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
