package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
)

// The phases of BenchmarkCPU.
const (
	cpuIdleWindow  = 60 * time.Second
	cpuSequential  = 50
	cpuBurst       = 100
	cpuSettle      = 5 * time.Second
	cpuBurstWorker = 8
)

// BenchmarkCPU measures the agent's CPU time as the desktop app runs it
// with Docker: `--adminInstall --docker`, every other setting at its
// default (so the sockets source runs too, with its eBPF wake-ups where
// the kernel allows them, and the host-switch probe and list), against the
// real dockerd (with its userland proxy, docker-proxy, as it runs by
// default) and the real gvproxy. The agent runs inside dockerd's network
// namespace, as it runs in the guest with dockerd beside it (its sockets,
// its iptables), and reaches gvproxy's forwarder API at a loopback port
// there, forwarded by the benchmark to gvproxy's unix socket. In turn it
// measures:
//
//   - idle-0: at rest with no container, over cpuIdleWindow, once the
//     agent has listed its sockets and host-switch and cpuSettle has passed;
//   - sequential: cpuSequential containers started one after the other,
//     each with one published port (on 127.0.0.1 and on 0.0.0.0 in turn),
//     the next one once gvproxy lists the last one's forward; CPU per
//     start, rest between starts included;
//   - idle-50: at rest with those containers running;
//   - burst: cpuBurst more containers started at once (cpuBurstWorker
//     docker CLIs at a time), from the first docker run until gvproxy
//     lists every forward and cpuSettle more; CPU per container;
//   - stop: every container removed at once (docker rm -f), until gvproxy
//     lists none of them (or the same ones for cpuSettle: forwards-left
//     says how many an agent left behind) and cpuSettle more; CPU per
//     container.
//
// CPU time is the agent's user and system time, its threads' sum from
// /proc/<pid>/task/*/schedstat (nanoseconds), plus that of the child
// processes it ran and waited for (iptables; /proc/<pid>/stat cutime and
// cstime, in ticks). Only this benchmark's load runs on the engines. With
// GUESTAGENT_PROFILE_DIR set, a CPU profile of each phase is written there
// instead (cpu-PHASE.pprof): the profiler's own cost then inflates the
// figures, so they are not for comparison. GUESTAGENT_CPU_ARGS adds
// arguments to the agent's command line and GUESTAGENT_CPU_IDLE_ONLY
// stops after idle-0, to tell which part costs what at rest.
// GUESTAGENT_REFERENCE names the desktop app's own agent, which then runs
// the same phases on the same engines after this one (see
// referenceCommand).
func BenchmarkCPU(b *testing.B) {
	testenv.Integration(b)
	dir := b.TempDir()
	bin, _ := buildAgent(b, dir)
	if err := os.MkdirAll(filepath.Join(dir, "docker"), 0o755); err != nil {
		b.Fatal(err)
	}
	docker, err := dockerdtest.Start(filepath.Join(dir, "docker"))
	if err != nil {
		testenv.Missing(b, "dockerd ("+err.Error()+")")
	}
	defer docker.Close()
	gv := gvproxytest.Start(b)
	statusAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(b))
	profiles := os.Getenv("GUESTAGENT_PROFILE_DIR")

	// The forwarder API inside dockerd's namespace, where the agents run,
	// and a wsl-proxy peer (WSL integration is on by default).
	api := forwardInNetns(b, docker.Netns, gv.Socket())
	wsl := &wslproxytest.Peer{Path: filepath.Join(dir, "wsl-proxy.sock"), RecordOnly: true}
	if err := wsl.Start(); err != nil {
		b.Fatal(err)
	}
	defer wsl.Stop()
	ports := cpuPorts(b, cpuSequential+cpuBurst)
	b.Run("guestagent", func(b *testing.B) {
		for b.Loop() {
			args := []string{
				"--adminInstall", "--docker", "--dockerHost=" + docker.Host,
				"--hostSwitchURL=http://" + api, "--wslProxySocket=" + wsl.Path,
				"--stateDir=" + filepath.Join(dir, "state"), "--controlSocket=" + filepath.Join(dir, "ctl.sock"),
			}
			if profiles != "" {
				args = append(args, "--statusAddr="+statusAddr, "--pprof")
			}
			args = append(args, strings.Fields(os.Getenv("GUESTAGENT_CPU_ARGS"))...)
			c := &cpuRun{b: b, docker: docker, gv: gv, ports: ports, api: "tcp " + api, profiles: profiles, statusAddr: statusAddr}
			argv := testenv.InNetns(docker.Netns, append([]string{bin}, args...)...)
			c.start(exec.Command(argv[0], argv[1:]...), filepath.Join(dir, "agent-cpu.log"))
			c.waitLog("sockets listed")
			c.measure()
		}
	})
	if ref := os.Getenv("GUESTAGENT_REFERENCE"); ref != "" {
		b.Run("reference", func(b *testing.B) {
			for b.Loop() {
				c := &cpuRun{b: b, docker: docker, gv: gv, ports: ports, api: "tcp " + api}
				c.start(referenceCommand(b, dir, ref, docker, api, wsl.Path), filepath.Join(dir, "reference-cpu.log"))
				// It logs nothing when it is ready: it first looks for
				// dockerd's socket 5 s after start.
				c.waitLog("Starting Rancher Desktop Agent")
				time.Sleep(10 * time.Second)
				c.measure()
			}
		})
	}
}

// referenceCommand returns the command that runs the reference agent (the
// desktop app's own, at path ref) as the app runs it with Docker,
// `-docker -adminInstall`, inside dockerd's network namespace (it reads
// its own namespace's sockets and iptables) and a mount namespace of its
// own, where /run holds links to the test's dockerd socket and a wsl-proxy
// peer (it looks for both at fixed paths). Its forwarder API requests go
// to a fixed host name, through the proxy of HTTP_PROXY: a forwarder to
// gvproxy's socket, listening on 127.0.0.1 inside the namespace.
func referenceCommand(b *testing.B, dir, ref string, docker *dockerdtest.Dockerd, api, wsl string) *exec.Cmd {
	sock := strings.TrimPrefix(docker.Host, "unix://")
	script := fmt.Sprintf("mount -t tmpfs tmpfs /run && ln -s %s /run/docker.sock && ln -s %s /run/wsl-proxy.sock && exec env HTTP_PROXY=http://%s DOCKER_HOST=%s %s -docker -adminInstall",
		sock, wsl, api, docker.Host, ref)
	argv := testenv.InNetns(docker.Netns, "unshare", "-m", "--propagation", "private", "sh", "-c", script)
	return exec.Command(argv[0], argv[1:]...)
}

// forwardInNetns listens on a loopback port inside the network namespace
// ns and forwards each connection to the unix socket at path, until the
// benchmark ends; it returns the address it listens on.
func forwardInNetns(b testing.TB, ns, path string) string {
	ln := listenInNetns(b, ns, "127.0.0.1:0")
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("unix", path)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c); u.(*net.UnixConn).CloseWrite() }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return ln.Addr().String()
}

// listenInNetns opens a TCP listener on addr inside the network namespace
// ns.
func listenInNetns(b testing.TB, ns, addr string) net.Listener {
	l, err := inNetns(ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if err != nil {
		b.Fatal(err)
	}
	return l
}

// inNetns calls open inside the network namespace ns (testenv.Within).
func inNetns[T any](ns string, open func() (T, error)) (T, error) { return testenv.Within(ns, open) }

// start starts the agent's command, its output going to the file log.
func (c *cpuRun) start(cmd *exec.Cmd, log string) {
	f, err := os.Create(log)
	if err != nil {
		c.b.Fatal(err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		c.b.Fatal(err)
	}
	c.cmd, c.log = cmd, log
	c.b.Cleanup(func() {
		if c.cmd != nil {
			_ = c.cmd.Process.Kill()
			_ = c.cmd.Wait()
		}
	})
}

// measure runs the phases (see BenchmarkCPU) and stops the agent.
func (c *cpuRun) measure() {
	b := c.b
	defer func() {
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		_ = c.cmd.Wait()
		c.cmd = nil
	}()
	time.Sleep(cpuSettle)
	c.phase("idle-0", func() int { time.Sleep(cpuIdleWindow); return 0 }, "idle-0-cpu-%", cpuIdleWindow)
	if os.Getenv("GUESTAGENT_CPU_IDLE_ONLY") != "" {
		return
	}
	var names []string
	left := 0 // forwards still on gvproxy after the stop
	c.phase("sequential", func() int {
		for range cpuSequential {
			i := len(names)
			c.run(i)
			names = append(names, cpuName(i))
			c.waitForwards(map[string]bool{c.forward(i): true})
		}
		return cpuSequential
	}, "sequential-cpu-ms/start", 0)
	time.Sleep(cpuSettle)
	c.phase("idle-50", func() int { time.Sleep(cpuIdleWindow); return 0 }, "idle-50-cpu-%", cpuIdleWindow)
	c.phase("burst", func() int {
		batch := make([]int, cpuBurst)
		want := map[string]bool{}
		for i := range batch {
			batch[i] = len(names) + i
			want[c.forward(batch[i])] = true
		}
		if err := testenv.ForEach(cpuBurstWorker, batch, func(i int) error { c.run(i); return nil }); err != nil {
			b.Fatal(err)
		}
		for _, i := range batch {
			names = append(names, cpuName(i))
		}
		c.waitForwards(want)
		time.Sleep(cpuSettle)
		return cpuBurst
	}, "burst-cpu-ms/start", 0)
	c.phase("stop", func() int {
		if err := c.docker.RemoveAll(names); err != nil {
			b.Fatal(err)
		}
		left = c.waitGone()
		time.Sleep(cpuSettle)
		return len(names)
	}, "stop-cpu-ms/container", 0)
	b.ReportMetric(float64(left), "forwards-left")
}

// cpuRun is one agent measured by BenchmarkCPU.
type cpuRun struct {
	b          *testing.B
	cmd        *exec.Cmd
	docker     *dockerdtest.Dockerd
	gv         *gvproxytest.Gvproxy
	log        string
	profiles   string
	statusAddr string
	ports      []int  // host port of container i
	api        string // "tcp ADDR" of the forwarder API inside the namespace, a host listener of the benchmark's
}

// run starts container i (cpuName), publishing port 80 on c.forward(i).
func (c *cpuRun) run(i int) {
	_, local, _ := strings.Cut(c.forward(i), " ")
	if _, err := c.docker.Docker("run", "-d", "--name", cpuName(i), "-p", local+":80", dockerdtest.WebImage); err != nil {
		c.b.Fatal(err)
	}
}

func cpuName(i int) string { return fmt.Sprintf("cpu%d", i) }

// forward is the forward gvproxy lists for container i: its port on
// 127.0.0.1 when i is even, on 0.0.0.0 when odd ("tcp 0.0.0.0:21001").
func (c *cpuRun) forward(i int) string {
	ip := "127.0.0.1"
	if i%2 == 1 {
		ip = "0.0.0.0"
	}
	return fmt.Sprintf("tcp %s:%d", ip, c.ports[i])
}

// cpuPorts returns n ports that are free for TCP on this machine, where
// gvproxy listens.
func cpuPorts(b *testing.B, n int) []int {
	var ports []int
	seen := map[int]bool{}
	for len(ports) < n {
		p := testenv.FreePort(b)
		if !seen[p] {
			seen[p] = true
			ports = append(ports, p)
		}
	}
	return ports
}

// waitLog waits for the agent to log line, the sign that it is ready.
func (c *cpuRun) waitLog(line string) {
	testenv.Eventually(c.b, time.Minute, "the agent's log line "+line, func() (bool, string) {
		out, _ := os.ReadFile(c.log)
		return strings.Contains(string(out), line), string(out)
	})
}

// waitForwards waits until every forward of want is on gvproxy.
func (c *cpuRun) waitForwards(want map[string]bool) {
	deadline := time.Now().Add(10 * time.Minute)
	for {
		got := ourForwards(c.b, c.gv.URL())
		n := 0
		for _, f := range got {
			if want[f] {
				n++
			}
		}
		if n == len(want) {
			return
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(c.log)
			c.b.Fatalf("gvproxy lists %v after 10 minutes, want %v\n%s", got, want, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitGone waits until gvproxy lists none of the agent's forwards, or the
// same ones for cpuSettle (an agent that leaves some behind), and
// returns how many are left.
func (c *cpuRun) waitGone() int {
	deadline := time.Now().Add(10 * time.Minute)
	last, since := []string(nil), time.Now()
	for {
		// The sockets source exposes the benchmark's own listener
		// there; it stays all along.
		got := slices.DeleteFunc(ourForwards(c.b, c.gv.URL()), func(f string) bool { return f == c.api })
		if len(got) == 0 {
			return 0
		}
		if !slices.Equal(got, last) {
			last, since = got, time.Now()
		} else if time.Since(since) >= cpuSettle || time.Now().After(deadline) {
			c.b.Logf("forwards left on gvproxy: %v", got)
			out, _ := os.ReadFile(c.log)
			for _, f := range got {
				_, port, _ := net.SplitHostPort(strings.TrimPrefix(f, "tcp "))
				for line := range strings.Lines(string(out)) {
					if strings.Contains(line, ":"+port) {
						c.b.Logf("agent log on %s: %s", f, strings.TrimSpace(line))
					}
				}
			}
			return len(got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// phase runs do, which returns how many containers it started or stopped,
// and reports the agent's CPU time over it: as a share of window when
// window is set, else in ms per container.
func (c *cpuRun) phase(name string, do func() int, unit string, window time.Duration) {
	if c.profiles != "" {
		done := make(chan error, 1)
		go func() { done <- c.profile(name, window) }()
		do()
		if err := <-done; err != nil {
			c.b.Fatal(err)
		}
		return
	}
	own0, children0 := agentCPU(c.b, c.cmd.Process.Pid)
	start := time.Now()
	n := do()
	own, children := agentCPU(c.b, c.cmd.Process.Pid)
	own, children = own-own0, children-children0
	if window > 0 {
		c.b.ReportMetric(100*(own+children).Seconds()/time.Since(start).Seconds(), unit)
		return
	}
	c.b.ReportMetric(float64(own+children)/float64(time.Millisecond)/float64(n), unit)
	c.b.ReportMetric(float64(children)/float64(time.Millisecond)/float64(n), name+"-children-cpu-ms")
	c.b.ReportMetric(time.Since(start).Seconds(), name+"-s")
}

// profile writes a CPU profile of the agent's first seconds of a phase
// (window, or 30 s for a phase of containers) to the profile directory.
func (c *cpuRun) profile(name string, window time.Duration) error {
	if window == 0 {
		window = 30 * time.Second
	}
	// The agent serves its profiles inside dockerd's namespace.
	client := &http.Client{Transport: &http.Transport{DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
		return inNetns(c.docker.Netns, func() (net.Conn, error) { return net.Dial(network, addr) })
	}}}
	res, err := client.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.statusAddr, int(window.Seconds())))
	if err != nil {
		return err
	}
	defer res.Body.Close()
	f, err := os.Create(filepath.Join(c.profiles, "cpu-"+name+".pprof"))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.ReadFrom(res.Body)
	return err
}

// agentCPU returns the CPU time of pid's threads and that of its
// waited-for children.
func agentCPU(b *testing.B, pid int) (own, children time.Duration) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(tasks) == 0 {
		b.Fatalf("no threads of %d: %v", pid, err)
	}
	var sum time.Duration
	for _, t := range tasks {
		data, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		f := strings.Fields(string(data))
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			b.Fatalf("%s: %q", t, data)
		}
		sum += time.Duration(ns)
	}
	f, err := testenv.ProcStat(pid)
	if err != nil {
		b.Fatal(err)
	}
	cu, err1 := strconv.ParseInt(f[13], 10, 64)
	cs, err2 := strconv.ParseInt(f[14], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("unexpected child CPU times in /proc/%d/stat: %q %q", pid, f[13], f[14])
	}
	return sum, time.Duration(cu+cs) * time.Second / userHZ
}
