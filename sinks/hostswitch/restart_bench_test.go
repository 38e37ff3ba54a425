package hostswitch_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

// restartForwards is how many forwards the agent holds when gvproxy
// restarts, and restartSamples how many restarts one measurement makes.
const (
	restartForwards = 20
	restartSamples  = 200
)

// benchAddr is the loopback address the benchmarks' forwards listen on,
// away from 127.0.0.1 where other tests take ports.
var benchAddr = netip.MustParseAddr("127.77.1.1")

// benchPorts returns n ports free on benchAddr a moment ago.
func benchPorts(b *testing.B, n int) []uint16 {
	b.Helper()
	var out []uint16
	for len(out) < n {
		l, err := net.Listen("tcp", netip.AddrPortFrom(benchAddr, 0).String())
		if err != nil {
			b.Fatalf("a port on %s: %v", benchAddr, err)
		}
		out = append(out, uint16(l.Addr().(*net.TCPAddr).Port))
		l.Close()
	}
	return out
}

func benchMapping(id string, ports []uint16) core.Mapping {
	m := core.Mapping{Key: core.Key{Source: "docker", ID: id}}
	for _, p := range ports {
		m.Ports = append(m.Ports, core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: benchAddr, HostPort: p})
	}
	return m
}

// benchRouter runs the agent's router with the host-switch sink at its
// flags' defaults (probe every 500ms, full check every 5s) and an
// ownership record, as the agent runs it, until the benchmark ends.
func benchRouter(b *testing.B, url string, dial func(context.Context, string, string) (net.Conn, error)) *core.Router {
	b.Helper()
	s, err := hostswitch.New(hostswitch.Config{
		BaseURL:       url,
		GuestIP:       hostswitch.DefaultGuestIP,
		ProbeInterval: hostswitch.DefaultProbeInterval,
		CheckInterval: hostswitch.DefaultCheckInterval,
		Dial:          dial,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	r := core.NewRouter(core.RouterConfig{StateDir: b.TempDir()})
	r.AddSink(hostswitch.Name, s, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = r.Run(ctx)
	}()
	b.Cleanup(func() { cancel(); <-done })
	return r
}

// restoredWatcher lists gvproxy's forwards on loopback, on a connection of
// its own, every millisecond until the wanted ones are all there.
type restoredWatcher struct {
	s    *hostswitch.Sink
	want []string
}

func newRestoredWatcher(b *testing.B, g *gvproxytest.Gvproxy, ports []uint16) *restoredWatcher {
	s, err := hostswitch.New(hostswitch.Config{BaseURL: g.URL(), GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	w := &restoredWatcher{s: s}
	for _, p := range ports {
		w.want = append(w.want, netip.AddrPortFrom(benchAddr, p).String())
	}
	slices.Sort(w.want)
	return w
}

// wait returns when every wanted forward is listed.
func (w *restoredWatcher) wait(b *testing.B, timeout time.Duration) time.Time {
	b.Helper()
	deadline := time.Now().Add(timeout)
	var have []string
	for time.Now().Before(deadline) {
		all, err := w.s.Forwards(context.Background())
		if err == nil {
			have = have[:0]
			for _, f := range all {
				if _, found := slices.BinarySearch(w.want, f.Local); found {
					have = append(have, f.Local)
				}
			}
			if len(have) == len(w.want) {
				return time.Now()
			}
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("after %s only %d of %d forwards are back", timeout, len(have), len(w.want))
	return time.Time{}
}

func reportLatencies(b *testing.B, lat []time.Duration, suffix string) {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.50)), "p50-ms"+suffix)
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), "p99-ms"+suffix)
	b.ReportMetric(ms(slices.Max(lat)), "max-ms"+suffix)
}

// BenchmarkDeliveryLatencyGvproxyRestart kills gvproxy while the agent's
// router holds restartForwards forwards on it, starts it again on the same
// address (with none of them), and times how long after its API first
// accepts a connection again all of them are listed again, restartSamples
// times, with the sink's default settings. Before each kill it waits a
// random part of a probe interval, so that restarts fall anywhere in the
// probe's cycle.
//
// loopback: the agent reaches the API on loopback, where the kill closes
// its connections at once. tap: the agent reaches it at the gateway through
// gvforwarder and a tap device in a namespace of the test's, where its
// connections stay open until their next packet meets the new network
// stack; gvforwarder dials gvproxy again after a second's pause, so the
// figures from the API's restart include that pause, and the ones marked
// -guest are timed from the moment the guest's tap device is configured
// again (gvproxytest.Guest.Joined).
func BenchmarkDeliveryLatencyGvproxyRestart(b *testing.B) {
	b.Run("loopback", func(b *testing.B) {
		g := gvproxytest.Start(b)
		ports := benchPorts(b, restartForwards)
		r := benchRouter(b, g.URL(), nil)
		w := newRestoredWatcher(b, g, ports)
		r.Emitter("docker").Snapshot([]core.Mapping{benchMapping("c", ports)})
		w.wait(b, 30*time.Second)
		var lat []time.Duration
		for b.Loop() {
			for range restartSamples {
				time.Sleep(rand.N(hostswitch.DefaultProbeInterval))
				g.Stop()
				g.Start()
				lat = append(lat, w.wait(b, 30*time.Second).Sub(g.UpAt()))
			}
		}
		reportLatencies(b, lat, "")
		b.ReportMetric(float64(len(lat)), "samples")
		b.ReportMetric(restartForwards, "forwards")
	})
	b.Run("tap", func(b *testing.B) {
		g, guest := startTapPath(b)
		ports := benchPorts(b, restartForwards)
		r := benchRouter(b, hostswitch.DefaultBaseURL, guest.Dial)
		w := newRestoredWatcher(b, g, ports)
		r.Emitter("docker").Snapshot([]core.Mapping{benchMapping("c", ports)})
		w.wait(b, 30*time.Second)
		var lat, joined []time.Duration
		for b.Loop() {
			for range restartSamples {
				time.Sleep(rand.N(hostswitch.DefaultProbeInterval))
				g.Stop()
				g.Start()
				guest.Rejoin()
				at := w.wait(b, 30*time.Second)
				lat, joined = append(lat, at.Sub(g.UpAt())), append(joined, at.Sub(guest.Joined()))
			}
		}
		reportLatencies(b, lat, "")
		reportLatencies(b, joined, "-guest")
		b.ReportMetric(float64(len(lat)), "samples")
		b.ReportMetric(restartForwards, "forwards")
	})
}

// idleForwards is how many forwards gvproxy holds while the probe's cost
// at rest is measured, and idleWindow how long each figure is measured.
const (
	idleForwards = 2000
	idleWindow   = 20 * time.Second
)

// BenchmarkIdleHostSwitchWatch measures what watching an idle gvproxy that
// holds idleForwards forwards costs, in CPU time per second of this
// process (the sink's watch loop and nothing else runs in it) and of
// gvproxy, over idleWindow: nothing watching (the baseline of both), the
// default (probe every 500ms, full list every 5s), the probe alone, and for
// comparison a full list every 500ms, which is what noticing a restart as
// soon would cost without the probe.
func BenchmarkIdleHostSwitchWatch(b *testing.B) {
	g := gvproxytest.Start(b)
	filler, err := hostswitch.New(hostswitch.Config{BaseURL: g.URL(), GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		b.Fatal(err)
	}
	defer filler.Close()
	ports := make([]uint16, idleForwards)
	for i := range ports {
		ports[i] = uint16(40000 + i)
	}
	// The ports of the other loopback address are free whatever holds
	// 127.0.0.1's; one taken by someone is skipped.
	held := 0
	for _, p := range ports {
		if err := filler.Send(context.Background(), core.Change{Mapping: benchMapping("idle", []uint16{p})}); err == nil {
			held++
		}
	}
	if held < idleForwards*9/10 {
		b.Fatalf("gvproxy took only %d of %d forwards", held, idleForwards)
	}
	for _, c := range []struct {
		name         string
		probe, check time.Duration
	}{
		{"none", 0, 0},
		{"default", hostswitch.DefaultProbeInterval, hostswitch.DefaultCheckInterval},
		{"probe-only", hostswitch.DefaultProbeInterval, 0},
		{"list-every-500ms", 0, 500 * time.Millisecond},
	} {
		b.Run(c.name, func(b *testing.B) {
			s, err := hostswitch.New(hostswitch.Config{BaseURL: g.URL(), GuestIP: hostswitch.DefaultGuestIP, ProbeInterval: c.probe, CheckInterval: c.check})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			// The check lists the forwards, as the router's reconcile
			// does.
			checks := 0
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				defer close(done)
				s.WatchPeer(ctx, func() {
					checks++
					if _, err := s.List(ctx); err != nil && ctx.Err() == nil {
						b.Error(err)
					}
				})
			}()
			var self, gv float64
			for b.Loop() {
				selfBefore, gvBefore := selfCPU(b), procCPU(b, g.Pid())
				start := time.Now()
				time.Sleep(idleWindow)
				secs := time.Since(start).Seconds()
				self = (selfCPU(b) - selfBefore).Seconds() / secs
				gv = (procCPU(b, g.Pid()) - gvBefore).Seconds() / secs
			}
			cancel()
			<-done
			b.ReportMetric(1e6*self, "agent-cpu-us/s")
			b.ReportMetric(1e6*gv, "gvproxy-cpu-us/s")
			b.ReportMetric(float64(held), "forwards")
			b.ReportMetric(float64(checks), "lists")
		})
	}
}

// selfCPU is this process's CPU time so far.
func selfCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is the CPU time so far of process pid's threads, from their
// schedstat (in nanoseconds; a thread that ended takes its share along,
// and gvproxy's Go threads live as long as it does).
func procCPU(b *testing.B, pid int) time.Duration {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		b.Fatalf("no threads of process %d: %v", pid, err)
	}
	var sum time.Duration
	for _, path := range tasks {
		data, err := os.ReadFile(path)
		if err != nil {
			continue // the thread ended
		}
		var ns int64
		if _, err := fmt.Sscan(string(data), &ns); err != nil {
			b.Fatalf("%s: %v", path, err)
		}
		sum += time.Duration(ns)
	}
	return sum
}
