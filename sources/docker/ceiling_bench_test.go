package docker_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/events"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sources/docker"
	"github.com/guestagent/guestagent/sources/docker/dockerfake"
)

// ceilingContainers is how many containers the ceiling benchmarks start.
const ceilingContainers = 10000

// ceilingBasePort is the first host port of the ceiling benchmarks: one
// port per container from here, all below the ephemeral range. gvproxy
// binds them inside a network namespace of the benchmark's own, so no
// other test or process can hold them.
const ceilingBasePort = 1100

// BenchmarkCeilingDocker measures the docker source and the router with
// no engine and no peer in the way: a fake Docker daemon (dockerfake)
// replays the start events of 10,000 containers, each publishing one
// port (-p P:80, so a 0.0.0.0 binding and its [::] twin), as fast as the
// source reads them, and an in-process sink that does no I/O takes the
// ports. The router runs as the agent does by default: the non-admin
// policy (bindings moved to localhost) and an ownership record in a
// state directory. It reports the time from the first event to the last
// port delivered, and each container's latency from its event (stamped
// as the fake writes it to the stream) to the arrival of its port.
func BenchmarkCeilingDocker(b *testing.B) {
	for b.Loop() {
		rec := newDeliveries(ceilingContainers)
		ceilingDocker(b, rec, rec)
	}
}

// BenchmarkCeilingDockerGvproxy is BenchmarkCeilingDocker with the
// host-switch sink (default settings) in front of the real gvproxy, which
// runs in a network namespace of the benchmark's own and so opens the
// 10,000 forwards there. A port counts as delivered when gvproxy has
// answered its expose request (it listens by then).
func BenchmarkCeilingDockerGvproxy(b *testing.B) {
	for b.Loop() {
		g, dial := gvproxyInNetns(b)
		snk, err := hostswitch.New(hostswitch.Config{
			BaseURL: g.URL(), GuestIP: hostswitch.DefaultGuestIP,
			ProbeInterval: hostswitch.DefaultProbeInterval, CheckInterval: hostswitch.DefaultCheckInterval,
			Dial: dial,
		})
		if err != nil {
			b.Fatal(err)
		}
		rec := newDeliveries(ceilingContainers)
		ceilingDocker(b, timedSink{snk, rec}, rec)
		_ = snk.Close()
	}
}

// ceilingDocker runs the fake daemon, the source and a router delivering
// to snk, starts the containers, and reports the figures once rec has
// every port.
func ceilingDocker(b *testing.B, snk core.Sink, rec *deliveries) {
	b.Helper()
	var mu sync.Mutex
	stamps := make(map[string]time.Time, ceilingContainers)
	fake := dockerfake.Start(b, func(m events.Message) {
		mu.Lock()
		stamps[m.Actor.ID] = time.Unix(0, m.TimeNano)
		mu.Unlock()
	})
	src, err := docker.New(docker.Config{Host: fake.Host()})
	if err != nil {
		b.Fatal(err)
	}
	r := core.NewRouter(core.RouterConfig{Policy: core.ModeLocal.Policy(), StateDir: b.TempDir()})
	sets := &timedEmitter{at: make(map[string]time.Time, ceilingContainers)}
	r.AddSource(docker.Name, core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
		sets.mu.Lock()
		sets.Emitter = out
		sets.mu.Unlock()
		return src.Run(ctx, sets)
	}))
	r.AddSink("sink", snk, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	testenv.Eventually(b, 30*time.Second, "the source watching the fake daemon", func() (bool, string) {
		st := r.Status()
		return len(st.Sources) == 1 && st.Sources[0].Synced && fake.Streams() == 1,
			fmt.Sprintf("sources %+v, %d event streams", st.Sources, fake.Streams())
	})

	cs := make([]dockerfake.Container, ceilingContainers)
	for i := range cs {
		cs[i] = dockerfake.Container{
			ID:    fmt.Sprintf("%064x", i+1),
			Ports: dockerfake.Published(uint16(ceilingBasePort + i)),
			IP:    netip.AddrFrom4([4]byte{172, 17, byte(i >> 8), byte(i)}),
		}
	}
	fake.Run(cs...)
	select {
	case <-rec.done:
	case <-time.After(4 * time.Minute):
		b.Fatalf("only %d of %d ports delivered in 4 minutes", rec.count(), ceilingContainers)
	}

	mu.Lock()
	defer mu.Unlock()
	sets.mu.Lock()
	defer sets.mu.Unlock()
	var first, last, lastSet time.Time
	lat := make([]time.Duration, 0, len(cs))
	srcLat := make([]time.Duration, 0, len(cs))
	for i, c := range cs {
		ev, ok := stamps[c.ID]
		set, setOK := sets.at[c.ID]
		if !ok || !setOK {
			b.Fatalf("container %d: no event stamp (%t) or no Set (%t)", i, ok, setOK)
		}
		at := rec.at(uint16(ceilingBasePort + i))
		if first.IsZero() || ev.Before(first) {
			first = ev
		}
		if at.After(last) {
			last = at
		}
		if set.After(lastSet) {
			lastSet = set
		}
		lat = append(lat, at.Sub(ev))
		srcLat = append(srcLat, set.Sub(ev))
	}
	total := last.Sub(first)
	b.ReportMetric(total.Seconds(), "first-event-to-last-port-s")
	b.ReportMetric(lastSet.Sub(first).Seconds(), "first-event-to-last-set-s")
	b.ReportMetric(float64(len(cs))/total.Seconds(), "containers/s")
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.50)), "p50-ms")
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(slices.Max(lat)), "max-ms")
	b.ReportMetric(ms(sourcetest.Percentile(srcLat, 0.50)), "event-to-set-p50-ms")
	b.ReportMetric(ms(sourcetest.Percentile(srcLat, 0.99)), "event-to-set-p99-ms")
	b.ReportMetric(float64(len(lat)), "samples")
}

// timedEmitter passes what the source reports on to the router's
// emitter, noting when each container's Set returned: the source's share
// of the latency.
type timedEmitter struct {
	core.Emitter
	mu sync.Mutex
	at map[string]time.Time
}

func (e *timedEmitter) Set(m core.Mapping) {
	e.Emitter.Set(m)
	now := time.Now()
	e.mu.Lock()
	if _, ok := e.at[m.ID]; !ok {
		e.at[m.ID] = now
	}
	e.mu.Unlock()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// deliveries notes when each host port first reached the sink, and closes
// done once want ports have.
type deliveries struct {
	mu    sync.Mutex
	first map[uint16]time.Time
	want  int
	done  chan struct{}
}

func newDeliveries(want int) *deliveries {
	return &deliveries{first: make(map[uint16]time.Time, want), want: want, done: make(chan struct{})}
}

// Send makes deliveries an in-process sink that takes every change.
func (d *deliveries) Send(_ context.Context, c core.Change) error {
	if !c.Remove {
		d.note(c, time.Now())
	}
	return nil
}

func (d *deliveries) note(c core.Change, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range c.Mapping.Ports {
		if _, ok := d.first[p.HostPort]; ok {
			continue
		}
		d.first[p.HostPort] = now
		if len(d.first) == d.want {
			close(d.done)
		}
	}
}

func (d *deliveries) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.first)
}

func (d *deliveries) at(port uint16) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.first[port]
}

// timedSink is the host-switch sink, noting each port its peer took. The
// embedded sink gives the router its List, PortFilter and peer watching.
type timedSink struct {
	*hostswitch.Sink
	rec *deliveries
}

func (t timedSink) Send(ctx context.Context, c core.Change) error {
	err := t.Sink.Send(ctx, c)
	if err == nil && !c.Remove {
		t.rec.note(c, time.Now())
	}
	return err
}

// gvproxyInNetns starts the real gvproxy inside a new network namespace,
// so that its forwards' listeners and its API live there, and returns it
// with a dialer that connects from inside that namespace.
func gvproxyInNetns(b *testing.B) (*gvproxytest.Gvproxy, func(ctx context.Context, network, addr string) (net.Conn, error)) {
	b.Helper()
	path := "/var/run/netns/" + testenv.Netns(b)
	// gvproxytest starts gvproxy from this goroutine: on a thread moved
	// into the namespace, the process, its port and the check that its
	// API is up all belong to the namespace. The thread moves back after.
	runtime.LockOSThread()
	here, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		b.Fatal(err)
	}
	defer here.Close()
	there, err := os.Open(path)
	if err != nil {
		runtime.UnlockOSThread()
		b.Fatal(err)
	}
	defer there.Close()
	if err := unix.Setns(int(there.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		b.Fatalf("entering %s: %v", path, err)
	}
	g := gvproxytest.Start(b)
	if err := unix.Setns(int(here.Fd()), unix.CLONE_NEWNET); err != nil {
		// Still locked: the thread ends with the goroutine, never to run
		// anything else in the wrong namespace.
		b.Fatalf("leaving %s: %v", path, err)
	}
	runtime.UnlockOSThread()
	return g, func(_ context.Context, network, addr string) (net.Conn, error) {
		return loopbacknattest.DialNetworkFrom(path, network, addr)
	}
}
