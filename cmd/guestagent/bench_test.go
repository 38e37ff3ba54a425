package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/testenv"
)

const (
	burstSize  = 500
	idleWindow = 60 * time.Second
	// userHZ is the unit of /proc/<pid>/stat's CPU times on Linux.
	userHZ = 100
)

// BenchmarkBurst starts burstSize containers at once (eight at a time
// through the docker CLI) in the real dockerd while the agent runs, and
// measures how long until gvproxy exposes all of them: from the first
// start, and after the engine has started the last one.
func BenchmarkBurst(b *testing.B) {
	bed := newFaultBed(b, 1)
	bed.startAgent()
	if res := bed.converge(time.Now()); res.bad() {
		b.Fatalf("agent did not settle: %s", res)
	}
	for b.Loop() {
		ports := make(map[string]int, burstSize)
		names := make([]string, burstSize)
		for i := range names {
			names[i] = fmt.Sprintf("burst%d", bed.next())
			ports[names[i]] = bed.hostPort(20000, 29999)
		}
		var failed atomic.Int64
		start := time.Now()
		err := testenv.ForEach(8, names, func(name string) error {
			_, err := bed.docker.Docker("run", "-d", "--name", name, "-p", fmt.Sprintf("127.0.0.1:%d:80", ports[name]), testenv.WebImage)
			if err != nil {
				failed.Add(1)
			}
			return err
		})
		started := time.Now()
		if err != nil {
			b.Fatalf("%d containers failed to start, first: %v", failed.Load(), err)
		}
		deadline := started.Add(5 * time.Minute)
		for len(bed.forwards()) < burstSize {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d exposed 5 minutes after the last start\n%s", len(bed.forwards()), burstSize, bed.agentLogTail())
			}
			time.Sleep(50 * time.Millisecond)
		}
		exposed := time.Now()
		b.ReportMetric(exposed.Sub(start).Seconds(), "s-all-exposed")
		b.ReportMetric(started.Sub(start).Seconds(), "s-engine-started-all")
		b.ReportMetric(exposed.Sub(started).Seconds(), "s-exposed-after-last-start")
		b.StopTimer()
		if err := bed.docker.RemoveAll(names); err != nil {
			b.Logf("removing the containers: %v", err)
		}
		b.StartTimer()
	}
}

// BenchmarkIdle builds the agent as `make build` does and runs it with
// every source on (Docker, containerd, Kubernetes and the NAT rule scan)
// against the real engines, holding a few containers and services, then
// measures its CPU use and memory over idleWindow, and the binary's size.
func BenchmarkIdle(b *testing.B) {
	dir := b.TempDir()
	bin := filepath.Join(dir, "guestagent")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	fi, err := os.Stat(bin)
	if err != nil {
		b.Fatal(err)
	}

	bed := newFaultBed(b, 1)
	bed.agentBin = bin
	bed.churn(true, true, true)
	bed.churn(true, true, true)
	bed.startAgent()
	if res := bed.converge(time.Now()); res.bad() {
		b.Fatalf("agent did not settle: %s", res)
	}
	time.Sleep(5 * time.Second)
	pid := bed.agent.Process.Pid
	for b.Loop() {
		before := cpuTicks(b, pid)
		time.Sleep(idleWindow)
		used := float64(cpuTicks(b, pid)-before) / userHZ
		b.ReportMetric(100*used/idleWindow.Seconds(), "cpu-%")
	}
	b.ReportMetric(float64(procStatusKB(b, pid, "VmRSS"))/1024, "rss-MB")
	b.ReportMetric(float64(procStatusKB(b, pid, "VmHWM"))/1024, "peak-rss-MB")
	b.ReportMetric(float64(fi.Size())/(1<<20), "binary-MB")
	b.ReportMetric(float64(len(bed.lastHostSwitch)), "forwards")
}

// cpuTicks returns the user plus system CPU time of pid, in userHZ ticks.
func cpuTicks(b *testing.B, pid int) int64 {
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

// procStatusKB returns a "kB" field of /proc/<pid>/status.
func procStatusKB(b *testing.B, pid int, field string) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				b.Fatalf("%s: %q", field, line)
			}
			return n
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
