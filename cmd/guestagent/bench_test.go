package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/client"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
)

const (
	burstSize  = 500
	idleWindow = 60 * time.Second
	// userHZ is the unit of /proc/<pid>/stat's CPU times on Linux.
	userHZ = 100
)

// BenchmarkBurst starts burstSize containers at once (eight at a time
// through the docker CLI) in the real dockerd while the agent runs in the
// fault suite's configuration with its default settings, and measures for
// each container the time from its start event (stamped by dockerd) to
// the moment its forward appears on gvproxy (whose list of forwards the
// benchmark reads every 10 ms): p50, p99 and the maximum over the
// burstSize containers; and how long until all of them are exposed, from
// the first docker run, and after the engine started the last one.
func BenchmarkBurst(b *testing.B) {
	bed := newFaultBed(b, 1)
	bed.startAgent()
	if res := bed.converge(time.Now()); res.bad() {
		b.Fatalf("agent did not settle: %s", res)
	}
	cli, err := client.New(client.WithHost(bed.docker.Host))
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	for b.Loop() {
		ports := make(map[string]int, burstSize)
		names := make([]string, burstSize)
		for i := range names {
			names[i] = fmt.Sprintf("burst%d", bed.next())
			ports[names[i]] = bed.hostPort(20000, 29999)
		}
		ctx, cancel := context.WithCancel(context.Background())
		stream := cli.Events(ctx, client.EventsListOptions{Filters: make(client.Filters).
			Add("type", string(events.ContainerEventType)).Add("event", string(events.ActionStart))})
		startedAt := map[string]time.Time{} // container name -> its start event's stamp
		var streamErr error
		collected := make(chan struct{})
		go func() {
			defer close(collected)
			for len(startedAt) < burstSize {
				select {
				case msg := <-stream.Messages:
					startedAt[msg.Actor.Attributes["name"]] = time.Unix(0, msg.TimeNano)
				case streamErr = <-stream.Err:
					return
				}
			}
		}()
		var failed atomic.Int64
		var runErr error
		var started time.Time
		ran := make(chan struct{})
		start := time.Now()
		go func() {
			defer close(ran)
			runErr = testenv.ForEach(8, names, func(name string) error {
				_, err := bed.docker.Docker("run", "-d", "--name", name, "-p", fmt.Sprintf("127.0.0.1:%d:80", ports[name]), dockerdtest.WebImage)
				if err != nil {
					failed.Add(1)
				}
				return err
			})
			started = time.Now()
		}()
		// The forwards of the burst, by the moment gvproxy first listed
		// them ("tcp 127.0.0.1:P").
		want := make(map[string]bool, burstSize)
		for _, name := range names {
			want[fmt.Sprintf("tcp 127.0.0.1:%d", ports[name])] = true
		}
		seen := map[string]time.Time{}
		deadline := time.Now().Add(15 * time.Minute)
		for len(seen) < burstSize {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d exposed after 15 minutes\n%s", len(seen), burstSize, bed.agentLogTail())
			}
			time.Sleep(10 * time.Millisecond)
			now := time.Now()
			for _, f := range ourForwards(b, bed.gv.URL()) {
				if _, ok := seen[f]; !ok && want[f] {
					seen[f] = now
				}
			}
		}
		exposed := time.Now()
		<-ran
		if runErr != nil {
			b.Fatalf("%d containers failed to start, first: %v", failed.Load(), runErr)
		}
		select {
		case <-collected:
		case <-time.After(30 * time.Second):
		}
		cancel()
		<-collected
		if len(startedAt) < burstSize {
			b.Fatalf("%d start events of %d (%v)", len(startedAt), burstSize, streamErr)
		}
		var lat []time.Duration
		for _, name := range names {
			at, ok := seen[fmt.Sprintf("tcp 127.0.0.1:%d", ports[name])]
			if !ok {
				b.Fatalf("the forward of %s was never seen by the poller", name)
			}
			lat = append(lat, at.Sub(startedAt[name]))
		}
		b.ReportMetric(ms(sourcetest.Percentile(lat, 0.5)), "start-to-forward-p50-ms")
		b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), "start-to-forward-p99-ms")
		b.ReportMetric(ms(slices.Max(lat)), "start-to-forward-max-ms")
		b.ReportMetric(float64(len(lat)), "samples")
		b.ReportMetric(exposed.Sub(start).Seconds(), "s-all-exposed")
		b.ReportMetric(started.Sub(start).Seconds(), "s-engine-started-all")
		b.StopTimer()
		if err := bed.docker.RemoveAll(names); err != nil {
			b.Logf("removing the containers: %v", err)
		}
		b.StartTimer()
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkIdle builds the agent with `make build` and runs it at rest
// against the real engines in three configurations, one after the other on
// the same engines: "docker" (network-tunnel mode with the Docker source
// alone, its containers running), "docker-build" (the same on an agent
// built with the Docker source alone, make build PLUGINS=sources/docker)
// and "every-source" (the fault suite's
// configuration: Docker, containerd, Kubernetes, the NAT rule scan and the
// sockets source, with containers and services in each engine). Once the
// peers hold what the engines run, and 5 s more, it samples the agent's
// memory every second over idleWindow and reports its CPU use over the
// window, the median and maximum resident memory (VmRSS) and its anonymous
// and file-backed parts, the peak (VmHWM), the Go heap and the memory the
// Go runtime holds (from the agent's /debug/pprof/heap, --pprof), and the
// binary's size. With GUESTAGENT_PROFILE_DIR set, each configuration's heap
// profile is written there (idle-NAME.heap, for go tool pprof).
func BenchmarkIdle(b *testing.B) {
	dir := b.TempDir()
	bin, size := buildAgent(b, dir)

	bed := newFaultBed(b, 1)
	// dockerOnly measures the Docker-only configuration on the agent bin;
	// the first call starts its containers.
	var containers sync.Once
	dockerOnly := func(b *testing.B, name, bin string, size int64) {
		bed.t = b
		containers.Do(func() {
			bed.churn(true, false, false)
			bed.churn(true, false, false)
		})
		bed.agentBin = bin
		cmd := bed.startDockerOnly()
		defer func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			_ = cmd.Wait()
		}()
		want := bed.waitDockerOnly(cmd)
		measureIdle(b, cmd.Process.Pid, bed.statusAddr, name)
		b.ReportMetric(float64(size)/(1<<20), "binary-MB")
		b.ReportMetric(float64(want), "forwards")
	}
	b.Run("docker", func(b *testing.B) { dockerOnly(b, "docker", bin, size) })
	// The same configuration on an agent built with the Docker source alone
	// (the sinks the modes name are always in).
	b.Run("docker-build", func(b *testing.B) {
		custom, csize := buildAgent(b, filepath.Join(dir, "custom"), "sources/docker")
		dockerOnly(b, "docker-build", custom, csize)
	})
	bed.agentBin = bin
	b.Run("every-source", func(b *testing.B) {
		bed.churn(false, true, true)
		bed.churn(false, true, true)
		bed.t = b
		bed.agentArgs = []string{"--pprof"}
		bed.startAgent()
		defer bed.stopAgent()
		if res := bed.converge(time.Now()); res.bad() {
			b.Fatalf("agent did not settle: %s", res)
		}
		measureIdle(b, bed.agent.Process.Pid, bed.statusAddr, "every-source")
		b.ReportMetric(float64(size)/(1<<20), "binary-MB")
		b.ReportMetric(float64(len(bed.lastHostSwitch)), "forwards")
	})
}

// buildAgent builds the agent into dir with make build, as users build it
// (static, like the release binaries of make dist); plugins, when given,
// builds one with only those. It returns the binary and its size.
func buildAgent(b *testing.B, dir string, plugins ...string) (bin string, size int64) {
	b.Helper()
	args := []string{"--no-print-directory", "build", "BIN=" + dir}
	if len(plugins) > 0 {
		args = append(args, "PLUGINS="+strings.Join(plugins, " "))
	}
	mk := exec.Command("make", args...)
	mk.Dir = filepath.Join("..", "..") // the module's root, from cmd/guestagent
	if out, err := mk.CombinedOutput(); err != nil {
		b.Fatalf("make build: %v\n%s", err, out)
	}
	bin = filepath.Join(dir, "guestagent")
	fi, err := os.Stat(bin)
	if err != nil {
		b.Fatal(err)
	}
	return bin, fi.Size()
}

// startDockerOnly runs the agent in network-tunnel mode with the Docker
// source alone (the sockets source, on by default in that mode, off) and
// its profiles served on the status address.
func (b *faultBed) startDockerOnly() *exec.Cmd {
	b.t.Helper()
	log, err := os.OpenFile(filepath.Join(b.dir, "agent-docker.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	b.must(err)
	defer log.Close()
	cmd := exec.Command(b.agentBin,
		"--adminInstall", "--sources=docker", "--sockets=false",
		"--dockerHost="+b.docker.Host, "--dockerIptables="+b.iptables,
		"--hostSwitchURL="+b.proxy.URL, "--wslProxySocket="+b.wsl.Path,
		"--stateDir="+filepath.Join(b.dir, "state-docker"), "--controlSocket="+filepath.Join(b.dir, "ctl-docker.sock"),
		"--statusAddr="+b.statusAddr, "--pprof")
	cmd.Stdout, cmd.Stderr = log, log
	b.must(cmd.Start())
	return cmd
}

// waitDockerOnly waits until gvproxy holds exactly the IPv4 bindings of
// the running Docker containers (the only workload of the engines then),
// and 5 s more; it returns how many that is.
func (b *faultBed) waitDockerOnly(cmd *exec.Cmd) int {
	b.t.Helper()
	deadline := time.Now().Add(convergeLimit)
	for {
		bs, err := b.bindings()
		b.must(err)
		want, _ := b.expected(bs)
		got := b.forwards()
		if len(want) > 0 && slices.Equal(want, got) {
			time.Sleep(5 * time.Second)
			return len(want)
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(filepath.Join(b.dir, "agent-docker.log"))
			b.t.Fatalf("gvproxy holds %v, want %v\n%s", got, want, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// measureIdle samples the resting agent pid every second over idleWindow
// per loop iteration and reports its CPU and memory; addr is its status
// address, serving /debug/pprof/.
func measureIdle(b *testing.B, pid int, addr, name string) {
	var rss, anon, file []float64
	var cpu float64
	for b.Loop() {
		before := cpuTicks(b, pid)
		start := time.Now()
		for i := 1; i <= int(idleWindow/time.Second); i++ {
			time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second)))
			st := procStatus(b, pid)
			rss, anon, file = append(rss, st["VmRSS"]), append(anon, st["RssAnon"]), append(file, st["RssFile"])
		}
		cpu = float64(cpuTicks(b, pid)-before) / userHZ / time.Since(start).Seconds()
	}
	st := procStatus(b, pid)
	heap := heapStats(b, addr, name)
	b.ReportMetric(100*cpu, "cpu-%")
	b.ReportMetric(median(rss), "rss-MB")
	b.ReportMetric(slices.Max(rss), "rss-max-MB")
	b.ReportMetric(median(anon), "rss-anon-MB")
	b.ReportMetric(median(file), "rss-file-MB")
	b.ReportMetric(st["VmHWM"], "peak-rss-MB")
	b.ReportMetric(float64(len(rss)), "rss-samples")
	b.ReportMetric(heap["HeapInuse"]/(1<<20), "heap-inuse-MB")
	b.ReportMetric(heap["HeapAlloc"]/(1<<20), "heap-alloc-MB")
	b.ReportMetric(heap["Sys"]/(1<<20), "go-sys-MB")
	b.ReportMetric(heap["NextGC"]/(1<<20), "next-gc-MB")
}

func median(xs []float64) float64 {
	s := slices.Sorted(slices.Values(xs))
	return s[len(s)/2]
}

// heapStats reads the runtime.MemStats figures at the end of the agent's
// text heap profile, and writes its binary heap profile to
// $GUESTAGENT_PROFILE_DIR/idle-NAME.heap when that is set.
func heapStats(b *testing.B, addr, name string) map[string]float64 {
	get := func(query string) []byte {
		resp, err := http.Get("http://" + addr + "/debug/pprof/heap" + query)
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("heap profile: %s %v", resp.Status, err)
		}
		return data
	}
	if d := os.Getenv("GUESTAGENT_PROFILE_DIR"); d != "" {
		if err := os.WriteFile(filepath.Join(d, "idle-"+name+".heap"), get(""), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	out := map[string]float64{}
	for line := range strings.Lines(string(get("?debug=1"))) {
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "# "), " = ")
		if n, err := strconv.ParseFloat(strings.TrimSpace(v), 64); ok && err == nil {
			out[k] = n
		}
	}
	for _, k := range []string{"HeapInuse", "HeapAlloc", "Sys", "NextGC"} {
		if _, ok := out[k]; !ok {
			b.Fatalf("no %s in the heap profile's statistics", k)
		}
	}
	return out
}

// cpuTicks returns the user plus system CPU time of pid, in userHZ ticks.
func cpuTicks(b testing.TB, pid int) int64 {
	f, err := testenv.ProcStat(pid)
	if err != nil {
		b.Fatal(err)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("unexpected CPU times in /proc/%d/stat: %q %q", pid, f[11], f[12])
	}
	return utime + stime
}

// procStatus returns the "kB" fields of /proc/<pid>/status, in MB.
func procStatus(b *testing.B, pid int) map[string]float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]float64{}
	for line := range strings.Lines(string(data)) {
		k, v, _ := strings.Cut(line, ":")
		if v, ok := strings.CutSuffix(strings.TrimSpace(v), " kB"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				b.Fatalf("%s: %q", k, line)
			}
			out[k] = float64(n) / 1024
		}
	}
	for _, k := range []string{"VmRSS", "VmHWM", "RssAnon", "RssFile"} {
		if _, ok := out[k]; !ok {
			b.Fatalf("no %s in /proc/%d/status", k, pid)
		}
	}
	return out
}
