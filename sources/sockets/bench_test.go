package sockets_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/sockets"
)

// BenchmarkDeliveryLatency measures, in a private namespace and with the
// default interval and settle time, the time from the helper being told
// to listen on a new TCP port to the delivery of that port to a sink, with
// eBPF wake-ups (a dump right after listen(), then the settle time) and
// without (up to one interval until a dump sees the socket, then the
// settle time). Each listener opens at a random moment of the interval.
func BenchmarkDeliveryLatency(b *testing.B) {
	for _, w := range []string{sockets.WakeupsEBPF, sockets.WakeupsOff} {
		b.Run("wakeups="+w, func(b *testing.B) {
			r := newRig(b)
			r.wakeups = w
			arrivals := sourcetest.Deliver(b, sockets.Name, r.source(b, 0, 0, nil))
			sourcetest.MeasureLatency(b, arrivals, func(int) (uint16, time.Time) {
				time.Sleep(rand.N(sockets.DefaultInterval))
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
	r.wakeups = sockets.WakeupsOff
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

// BenchmarkIdleAgent runs the agent binary (--sources=sockets
// --sinks=stdout, every other setting its default) inside a private
// namespace that holds 1,000 TCP listeners and an echo server, and
// measures the agent process's CPU share of a core and resident memory
// over idleWindow: at rest, then while a client in the namespace opens and
// closes 100 connections a second to the echo server. With eBPF
// wake-ups and without.
func BenchmarkIdleAgent(b *testing.B) {
	const n, churnRate, idleWindow = 1000, 100, 30 * time.Second
	agent := buildAgent(b)
	for _, w := range []string{sockets.WakeupsEBPF, sockets.WakeupsOff} {
		b.Run("wakeups="+w, func(b *testing.B) {
			r := newRig(b)
			r.h.do(b, "range tcp 0.0.0.0 30000 %d", n)
			r.h.do(b, "serve tcp 0.0.0.0:29999")
			dir := b.TempDir()
			sock := filepath.Join(dir, "agent.sock")
			argv := testenv.InNetns(r.ns, agent, "--sources=sockets", "--sinks=stdout", "--socketsWakeups="+w,
				"--stateDir="+filepath.Join(dir, "state"), "--controlSocket="+sock)
			cmd := exec.Command(argv[0], argv[1:]...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				_ = cmd.Wait()
			})
			testenv.Eventually(b, 60*time.Second, fmt.Sprintf("%d ports in the agent's status", n+1), func() (bool, string) {
				got, err := statusPorts(agent, sock)
				return got == n+1, fmt.Sprintf("have %d (%v); agent log: %s", got, err, lastLines(stderr.String(), 5))
			})
			pid := agentPID(b, cmd.Process.Pid)
			time.Sleep(2 * time.Second) // the first deliveries' garbage settles
			for b.Loop() {
				rest, restRSS := measure(b, pid, idleWindow)
				r.h.do(b, "churn 127.0.0.1:29999 %d", churnRate)
				churn, churnRSS := measure(b, pid, idleWindow)
				r.h.do(b, "churn 127.0.0.1:29999 0")
				b.ReportMetric(rest, "rest-core-%")
				b.ReportMetric(restRSS, "rest-rss-MB")
				b.ReportMetric(churn, "churn-core-%")
				b.ReportMetric(churnRSS, "churn-rss-MB")
			}
		})
	}
}

// buildAgent builds the agent binary into a temporary directory; under
// -short it skips b instead.
func buildAgent(b testing.TB) string {
	b.Helper()
	testenv.Integration(b)
	out := filepath.Join(b.TempDir(), "guestagent")
	cmd := exec.Command("go", "build", "-tags", "grpcnotrace", "-o", out, "github.com/guestagent/guestagent/cmd/guestagent")
	if msg, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building the agent: %v\n%s", err, msg)
	}
	return out
}

// agentPID finds the agent under the namespace runner that started it.
func agentPID(b *testing.B, runner int) int {
	b.Helper()
	var pid int
	testenv.Eventually(b, 10*time.Second, "the agent's process", func() (bool, string) {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", runner))
		if err == nil && strings.TrimSpace(string(comm)) == "guestagent" {
			pid = runner
			return true, ""
		}
		kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", runner, runner))
		for _, f := range strings.Fields(string(kids)) {
			p, _ := strconv.Atoi(f)
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", p)); strings.TrimSpace(string(comm)) == "guestagent" {
				pid = p
				return true, ""
			}
		}
		return false, "not found"
	})
	return pid
}

// statusPorts asks the agent at sock how many host addresses it claims.
func statusPorts(agent, sock string) (int, error) {
	out, err := exec.Command(agent, "status", "--json", "--socket="+sock).Output()
	if err != nil {
		return 0, err
	}
	var st struct {
		Ports []json.RawMessage `json:"ports"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, err
	}
	return len(st.Ports), nil
}

// measure returns pid's CPU use over window, in percent of one core, and
// its resident memory at the end, in MB.
func measure(b *testing.B, pid int, window time.Duration) (float64, float64) {
	b.Helper()
	before, start := procCPU(b, pid), time.Now()
	time.Sleep(window)
	cpu := procCPU(b, pid) - before
	return float64(cpu) / float64(time.Since(start)) * 100, procRSS(b, pid)
}

// procCPU reads the user and system time of pid from /proc/PID/stat.
func procCPU(b *testing.B, pid int) time.Duration {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ
	return time.Duration(utime+stime) * time.Second / ticks
}

// procRSS reads VmRSS of pid, in MB.
func procRSS(b *testing.B, pid int) float64 {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	b.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func cpuTime(tb testing.TB) time.Duration {
	tb.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// wokenRig starts the source, with eBPF wake-ups, on a rig whose helper
// serves TCP on port, and returns once the server is reported, with the
// count of dumps wake-ups brought forward.
func wokenRig(b *testing.B, port int) (*rig, *atomic.Int64) {
	r := newRig(b)
	r.wakeups = sockets.WakeupsEBPF
	r.h.do(b, "serve tcp 0.0.0.0:%d", port)
	src := r.source(b, 0, 0, nil).(*sockets.Source)
	woken := new(atomic.Int64)
	sockets.SetDumpHook(src, func(byWake bool) {
		if byWake {
			woken.Add(1)
		}
	})
	router := sourcetest.Start(b, sockets.Name, src)
	testenv.Eventually(b, waitTimeout, "the server reported", func() (bool, string) {
		return len(router.Desired()) == 1, fmt.Sprintf("have %d", len(router.Desired()))
	})
	return r, woken
}

// BenchmarkIdleChurnWakeups counts the dumps that eBPF wake-ups bring
// forward over 10 s with the default interval and settle time: first with
// nothing happening in the namespace, then while a client in it opens and
// closes 100 connections a second to an echo server. The program sees
// every namespace, so listeners that other processes on the machine open
// or close count in both windows; the difference is churn's share.
func BenchmarkIdleChurnWakeups(b *testing.B) {
	const churnRate, window = 100, 10 * time.Second
	r, woken := wokenRig(b, 29999)
	count := func(during func()) float64 {
		before := woken.Load()
		during()
		return float64(woken.Load() - before)
	}
	for b.Loop() {
		quiet := count(func() { time.Sleep(window) })
		churn := count(func() {
			r.h.do(b, "churn 127.0.0.1:29999 %d", churnRate)
			time.Sleep(window)
			r.h.do(b, "churn 127.0.0.1:29999 0")
		})
		b.ReportMetric(quiet, "woken-dumps-quiet")
		b.ReportMetric(churn, "woken-dumps-churn")
		b.ReportMetric(float64(churnRate)*window.Seconds(), "connections")
	}
}

// BenchmarkForeignFlood measures what a listen/close loop in another
// network namespace (a container's) costs the source: the CPU of this
// process, which runs the source reading the test namespace with eBPF
// wake-ups, over 10 s while a process in a second namespace opens and
// closes a TCP listener and a bound UDP socket 1,000 times a second each,
// beside 10 s with nothing happening. The kernel drops the wake-ups of
// other namespaces, so the two should cost the same. The flooder's own
// CPU is reported too, to show the loop ran.
func BenchmarkForeignFlood(b *testing.B) {
	const rate, window = 1000, 10 * time.Second
	_, woken := wokenRig(b, 29998)
	other := startHelper(b, testenv.Netns(b), "")
	pid := other.cmd.Process.Pid
	measure := func(during func()) (cpuPercent, flooder, dumps float64) {
		w0, c0, f0, t0 := woken.Load(), cpuTime(b), procCPU(b, pid), time.Now()
		during()
		el := float64(time.Since(t0))
		return float64(cpuTime(b)-c0) / el * 100, float64(procCPU(b, pid)-f0) / el * 100, float64(woken.Load() - w0)
	}
	for b.Loop() {
		quietCPU, _, quietDumps := measure(func() { time.Sleep(window) })
		floodCPU, flooderCPU, floodDumps := measure(func() {
			other.do(b, "flood tcp 0.0.0.0:7201 %d", rate)
			other.do(b, "flood udp 0.0.0.0:7202 %d", rate)
			time.Sleep(window)
			other.do(b, "flood tcp 0.0.0.0:7201 0")
			other.do(b, "flood udp 0.0.0.0:7202 0")
		})
		b.ReportMetric(quietCPU, "quiet-cpu-%")
		b.ReportMetric(floodCPU, "flood-cpu-%")
		b.ReportMetric(flooderCPU, "flooder-cpu-%") // the loop's own, to show it ran
		b.ReportMetric(quietDumps, "woken-dumps-quiet")
		b.ReportMetric(floodDumps, "woken-dumps-flood")
	}
}

// BenchmarkRelay measures a TCP connection through the relay beside one
// that needs none, from a second namespace (the host side) to the guest
// namespace's relay address: a server on 127.0.0.1:P reached through the
// relay on RELAY:P, and the same server on 0.0.0.0:Q reached directly on
// RELAY:Q. Each of 300 connections per path dials, sends 64 bytes and
// reads their echo, then closes (p50 and p99 of that); then one connection
// per path echoes 64 MiB (throughput of what comes back).
func BenchmarkRelay(b *testing.B) {
	const conns, bulk = 300, 64 << 20
	r := newRelayRig(b)
	router, _ := run(b, r.relaySource(b, sockets.Config{RelayAddr: relayAddr}))
	relayed, direct := r.nextPort(), r.nextPort()
	r.h.do(b, "serve tcp 127.0.0.1:%d", relayed)
	r.h.do(b, "serve tcp 0.0.0.0:%d", direct)
	waitHas(b, router, fmt.Sprintf("tcp/127.0.0.1:%d", relayed))
	dial := func(port int) net.Conn {
		c, err := loopbacknattest.DialNetworkFrom(r.host, "tcp4", fmt.Sprintf("%s:%d", relayAddr, port))
		if err != nil {
			b.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		return c
	}
	roundTrip := func(port int) time.Duration {
		start := time.Now()
		c := dial(port)
		defer c.Close()
		msg := bytes.Repeat([]byte("x"), 64)
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	throughput := func(port int) float64 {
		c := dial(port)
		defer c.Close()
		start := time.Now()
		done := make(chan error, 1)
		go func() {
			_, err := io.CopyN(io.Discard, c, bulk)
			done <- err
		}()
		if _, err := io.CopyN(c, zeros{}, bulk); err != nil {
			b.Fatal(err)
		}
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		return float64(bulk) / (1 << 20) / time.Since(start).Seconds()
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for b.Loop() {
		for _, path := range []struct {
			name string
			port int
		}{{"relay", relayed}, {"direct", direct}} {
			lat := make([]time.Duration, conns)
			for i := range lat {
				lat[i] = roundTrip(path.port)
			}
			b.ReportMetric(ms(sourcetest.Percentile(lat, 0.50)), path.name+"-p50-ms")
			b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), path.name+"-p99-ms")
			b.ReportMetric(throughput(path.port), path.name+"-MiB/s")
		}
	}
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
