package core_test

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
)

// countingSink is the fastest sink that is still honest: it keeps what it
// holds (so that List answers the truth) and says when it has seen a
// given number of adds and of removes, and does nothing else.
type countingSink struct {
	mu      sync.Mutex
	held    map[core.Port]bool
	adds    int
	removes int
	waitFor int           // signal done when adds or removes reach it
	done    chan struct{} // closed when the count is reached
}

func newCountingSink() *countingSink { return &countingSink{held: map[core.Port]bool{}} }

// expect arms the sink: done closes once n more adds (or removes, with
// remove set) have arrived since the call.
func (s *countingSink) expect(n int, remove bool) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = make(chan struct{})
	if remove {
		s.waitFor = s.removes + n
	} else {
		s.waitFor = s.adds + n
	}
	return s.done
}

func (s *countingSink) Send(_ context.Context, c core.Change) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range c.Mapping.Ports {
		p.ContainerPort = 0 // the peer keys by host address, as List reports it
		if c.Remove {
			delete(s.held, p)
			s.removes++
		} else {
			s.held[p] = true
			s.adds++
		}
	}
	n := s.adds
	if c.Remove {
		n = s.removes
	}
	if s.done != nil && n == s.waitFor {
		close(s.done)
		s.done = nil
	}
	return nil
}

func (s *countingSink) List(context.Context) ([]core.Held, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]core.Held, 0, len(s.held))
	for p := range s.held {
		out = append(out, core.Held{Port: p, Target: "guest", Matches: true})
	}
	return out, nil
}

// burst is what the benchmark's source is asked to emit: n adds (or
// deletes) of the ids c0..c(n-1), then the time the last call returned.
type burst struct {
	n      int
	remove bool
	sent   chan time.Time
}

// burstSource is an in-process source that emits each burst it is handed
// as fast as the router takes it.
func burstSource(bursts <-chan burst) core.Source {
	return core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
		out.Snapshot(nil)
		for {
			select {
			case <-ctx.Done():
				return nil
			case b := <-bursts:
				for i := range b.n {
					id := "c" + strconv.Itoa(i)
					if b.remove {
						out.Delete(id)
					} else {
						out.Set(ceilingMapping(id, i))
					}
				}
				b.sent <- time.Now()
			}
		}
	})
}

// ceilingMapping is mapping i of a burst: one TCP port on 127.0.0.1, as a
// container published with -p 127.0.0.1:P:80.
func ceilingMapping(id string, i int) core.Mapping {
	return core.Mapping{Key: core.Key{ID: id}, Ports: []core.Port{{
		Protocol: core.TCP, ContainerPort: 80,
		HostIP: netip.AddrFrom4([4]byte{127, 0, 0, 1}), HostPort: uint16(10000 + i),
	}}}
}

// BenchmarkCeilingRouter measures the router alone: an in-process source
// sets N one-port mappings as fast as it can, an in-process sink that
// does no I/O takes them, then the source deletes them all. It reports
// mappings per second through the router for the adds and the removes
// (from the first Set to the last port at the sink), the source's own
// share (how long its N calls took), and the heap and RSS with N
// mappings held. Each size runs enough rounds for 20,000 mappings each
// way; "record" runs with an ownership record in a temporary --stateDir,
// as the agent does by default.
func BenchmarkCeilingRouter(b *testing.B) {
	for _, record := range []bool{false, true} {
		for _, n := range []int{1000, 10000} {
			name := fmt.Sprintf("n=%d/record=%t", n, record)
			b.Run(name, func(b *testing.B) { ceilingRouter(b, n, record) })
		}
	}
}

func ceilingRouter(b *testing.B, n int, record bool) {
	rounds := max(1, 20000/n)
	var addTime, removeTime, emitAdd, emitRemove time.Duration
	var heap, heapBase, rss uint64
	for b.Loop() {
		for round := range rounds {
			cfg := core.RouterConfig{}
			if record {
				cfg.StateDir = b.TempDir()
			}
			runtime.GC()
			base := heapInUse()
			sink := newCountingSink()
			bursts := make(chan burst)
			r := core.NewRouter(cfg)
			r.AddSource("bench", burstSource(bursts))
			r.AddSink("sink", sink, nil)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); _ = r.Run(ctx) }()

			run := func(remove bool) (through, emit time.Duration) {
				arrived := sink.expect(n, remove)
				sent := make(chan time.Time, 1)
				start := time.Now()
				bursts <- burst{n: n, remove: remove, sent: sent}
				select {
				case <-arrived:
				case <-time.After(5 * time.Minute):
					b.Fatalf("%d of %d mappings did not reach the sink in 5 minutes", n, n)
				}
				end := time.Now()
				return end.Sub(start), (<-sent).Sub(start)
			}
			t, e := run(false)
			addTime, emitAdd = addTime+t, emitAdd+e
			if round == 0 {
				runtime.GC()
				heap, heapBase, rss = heapInUse(), base, rssBytes(b)
			}
			t, e = run(true)
			removeTime, emitRemove = removeTime+t, emitRemove+e
			cancel()
			<-done
		}
	}
	total := float64(n * rounds * b.N)
	b.ReportMetric(total/addTime.Seconds(), "adds/s")
	b.ReportMetric(total/removeTime.Seconds(), "removes/s")
	b.ReportMetric(total/emitAdd.Seconds(), "source-sets/s")
	b.ReportMetric(total/emitRemove.Seconds(), "source-deletes/s")
	b.ReportMetric(float64(heap-min(heap, heapBase))/(1<<20), "heap-held-MiB")
	b.ReportMetric(float64(rss)/(1<<20), "rss-MiB")
	b.ReportMetric(float64(rounds*b.N), "rounds")
}

func heapInUse() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// rssBytes is the resident set of this process (VmRSS).
func rssBytes(b *testing.B) uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	b.Fatal("no VmRSS in /proc/self/status")
	return 0
}
