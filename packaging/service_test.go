package packaging_test

import (
	"bufio"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/guestagent/guestagent/internal/testenv"
)

// buildAgent builds the agent into dir and returns its path.
func buildAgent(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "guestagent")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/guestagent/guestagent/cmd/guestagent").CombinedOutput()
	if err != nil {
		t.Fatalf("building the agent: %v\n%s", err, out)
	}
	return bin
}

// listen starts the test binary, through a link in dir named comm, as a
// helper listening on addr in the namespace's network, and stops it when
// the test ends. It runs as root with every capability, as dockerd's
// docker-proxy does.
func (r *openrcRoot) listen(dir, comm, addr string) {
	r.t.Helper()
	self, err := os.Executable()
	if err != nil {
		r.t.Fatal(err)
	}
	link := filepath.Join(dir, comm)
	if err := os.Symlink(self, link); err != nil {
		r.t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(r.holder.Process.Pid), "-n", "--", link)
	cmd.Env = append(os.Environ(), listenEnv+"="+addr)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	if line, err := bufio.NewReader(out).ReadString('\n'); line != "listening\n" {
		r.t.Fatalf("%s on %s: %q, %v", comm, addr, line, err)
	}
}

// childPid returns the pid of the process supervise-daemon runs for the
// service, as it records it for OpenRC, 0 if none.
func (r *openrcRoot) childPid(service string) int {
	pid, _ := strconv.Atoi(strings.TrimSpace(readFile(r.path("/run/openrc/options/" + service + "/child_pid"))))
	return pid
}

// maxOpenFiles returns the soft and hard "Max open files" of a limits
// file's text.
func maxOpenFiles(t *testing.T, limits string) (soft, hard string) {
	t.Helper()
	for _, line := range lines(limits) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) >= 2 {
				return f[0], f[1]
			}
		}
	}
	t.Fatalf("no Max open files in %q", limits)
	return "", ""
}

// without returns caps without the names in drop.
func without(caps []string, drop ...string) []string {
	return slices.DeleteFunc(slices.Clone(caps), func(c string) bool { return slices.Contains(drop, c) })
}

// TestOpenRCServiceLimitsTheAgent runs the real agent under the real
// openrc-run and supervise-daemon, in a network namespace of its own,
// with the sockets source (eBPF wake-ups required) and the stdout sink,
// beside a plain listener and one held by a process named docker-proxy
// that runs with every capability. It checks the agent's process: the
// kept capabilities exactly, in its effective and bounding sets, the
// descriptor limit, the binary; and that it works with them: `guestagent
// status` answers over the control socket, the sockets are read on eBPF
// wake-ups, the plain listener is reported and docker-proxy's is left
// out. Then it shows what two of the capabilities are for: without
// sys_ptrace (and dac_read_search) the agent cannot read docker-proxy's
// descriptors and reports its port; without bpf, perfmon and sys_admin
// without net_admin and sys_admin the cgroup socket programs of the UDP wake-ups do not
// load; without bpf, perfmon and sys_admin the eBPF wake-ups are
// unavailable and the dump alone reads the sockets.
func TestOpenRCServiceLimitsTheAgent(t *testing.T) {
	root := newOpenRCRoot(t)
	testenv.Binary(t, "GUESTAGENT_GO", "go")
	root.install()
	dir := t.TempDir()
	agent := buildAgent(t, dir)
	root.listen(dir, "plain-listener", "0.0.0.0:18080")
	root.listen(dir, "docker-proxy", "127.0.0.1:18081")

	// The shipped limit where this machine lets root raise the hard limit
	// that far; else a lower one from conf.d, through the same rc_ulimit.
	wantFiles, ulimit := "65536", ""
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < 65536 {
		wantFiles, ulimit = "4096", "rc_ulimit='-n 4096'\n"
		t.Logf("the hard descriptor limit here is %d and root cannot raise it: testing rc_ulimit with -n 4096", lim.Max)
	}
	start := func(caps []string, wakeups string) {
		t.Helper()
		conf := fmt.Sprintf("GUESTAGENT_BINARY=%s\nGUESTAGENT_EXTRA_ARGS=%s\n%s",
			quote(agent), quote("--sinks=stdout --sockets --socketsWakeups="+wakeups+" --stateDir="+quote(dir+"/state")), ulimit)
		if caps != nil {
			conf += "GUESTAGENT_CAPABILITIES=" + quote(strings.Join(caps, ",")) + "\n"
		}
		root.writeFile("/etc/conf.d/guestagent", conf, 0o644)
		if out, code := root.service("start"); code != 0 {
			t.Fatalf("start: exit %d, %s\nlog:\n%s", code, out, readFile(root.path("/var/log/guestagent.log")))
		}
	}
	status := func(what string, cond func(string) bool) string {
		t.Helper()
		var last string
		testenv.Eventually(t, waitFor, what, func() (bool, string) {
			out, code := root.run(agent, "status")
			last = out
			return code == 0 && cond(out), fmt.Sprintf("exit %d:\n%s\nlog:\n%s", code, out, readFile(root.path("/var/log/guestagent.log")))
		})
		return last
	}
	checkProcess := func(want []string) {
		t.Helper()
		pid := root.childPid("guestagent")
		if pid == 0 {
			t.Fatal("supervise-daemon recorded no child pid")
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != agent {
			t.Errorf("process %d runs %q (%v), want the agent %s", pid, exe, err, agent)
		}
		got := procCaps(t, readFile(fmt.Sprintf("/proc/%d/status", pid)))
		for _, set := range []string{"CapEff", "CapPrm", "CapBnd"} {
			if !slices.Equal(got[set], want) {
				t.Errorf("%s = %q, want %q", set, got[set], want)
			}
		}
		if soft, hard := maxOpenFiles(t, readFile(fmt.Sprintf("/proc/%d/limits", pid))); soft != wantFiles || hard != wantFiles {
			t.Errorf("max open files %s (soft), %s (hard), want %s", soft, hard, wantFiles)
		}
	}
	stop := func() {
		t.Helper()
		if out, code := root.service("stop"); code != 0 {
			t.Fatalf("stop: exit %d, %s", code, out)
		}
	}

	start(nil, "ebpf")
	out := status("the plain listener in the status", func(s string) bool { return strings.Contains(s, "18080") })
	checkProcess(agentCaps)
	// The first report is one snapshot of every settled socket: had
	// docker-proxy's been taken, it would be there too.
	if strings.Contains(out, "18081") {
		t.Errorf("docker-proxy's port is reported:\n%s", out)
	}
	if !strings.Contains(out, "eBPF wake-ups") || strings.Contains(out, "unavailable") {
		t.Errorf("the status does not say the sockets are read on eBPF wake-ups:\n%s", out)
	}
	stop()

	noPtrace := without(agentCaps, "sys_ptrace", "dac_read_search")
	start(noPtrace, "ebpf")
	status("docker-proxy's port, which the agent can no longer tell", func(s string) bool { return strings.Contains(s, "18081") })
	checkProcess(noPtrace)
	stop()

	// The cgroup socket programs of the UDP wake-ups need net_admin (or
	// sys_admin, which the kernel takes for it): the tracepoint is left.
	noNetAdmin := without(agentCaps, "net_admin", "sys_admin")
	start(noNetAdmin, "ebpf")
	status("the sockets read without UDP wake-ups", func(s string) bool {
		return strings.Contains(s, "18080") && strings.Contains(s, "no UDP wake-ups")
	})
	checkProcess(noNetAdmin)
	stop()

	noBPF := without(agentCaps, "bpf", "perfmon", "sys_admin")
	start(noBPF, "auto")
	status("the sockets read without eBPF", func(s string) bool {
		return strings.Contains(s, "18080") && strings.Contains(s, "eBPF wake-ups unavailable")
	})
	checkProcess(noBPF)
	stop()
}

// TestOpenRCRespawnBacksOff runs a stub agent that exits at once on its
// first starts: supervise-daemon restarts it after a delay that doubles
// with each exit, up to GUESTAGENT_RESPAWN_MAX_DELAY, each delay said in
// the log; then the stub runs (the transient cause is gone), and after
// GUESTAGENT_RESPAWN_STABLE seconds of running, its next exit is
// restarted without delay. The starts counted over the crash loop are
// bounded by the delays: sleep never ends early, so the count is never
// more than the delays that fit in the time it took.
func TestOpenRCRespawnBacksOff(t *testing.T) {
	root := newOpenRCRoot(t)
	root.install()
	dir := t.TempDir()
	stub := stubAgent(t, dir)
	t.Cleanup(func() {
		if pid := stubPid(dir); pid > 1 {
			syscall.Kill(-pid, syscall.SIGKILL)
		}
	})
	const crashes = 6
	if err := os.WriteFile(filepath.Join(dir, "crashes"), []byte(strconv.Itoa(crashes)), 0o644); err != nil {
		t.Fatal(err)
	}
	root.writeFile("/etc/conf.d/guestagent", "GUESTAGENT_BINARY="+quote(stub)+
		"\nGUESTAGENT_RESPAWN_MAX_DELAY=4\nGUESTAGENT_RESPAWN_STABLE=8\n", 0o644)
	logFile := root.path("/var/log/guestagent.log")
	uptime := func() float64 {
		f := strings.Fields(readFile("/proc/uptime"))
		v, _ := strconv.ParseFloat(f[0], 64)
		return v
	}
	began := uptime()
	if out, code := root.service("start"); code != 0 {
		t.Fatalf("start: exit %d, %s", code, out)
	}
	testenv.Eventually(t, 2*waitFor, "the stub to run after its crashes", func() (bool, string) {
		pid := stubPid(dir)
		return pid != 0 && alive(pid), readFile(logFile)
	})
	elapsed := uptime() - began
	log := readFile(logFile)
	var delays []string
	for _, line := range lines(log) {
		if _, d, ok := strings.Cut(line, "; starting it again in "); ok {
			delays = append(delays, d)
		}
	}
	// 6 quick exits: restarts after 1, 2, 4 (the cap), 4, 4, 4 s.
	if want := []string{"1s", "2s", "4s", "4s", "4s", "4s"}; !slices.Equal(delays, want) {
		t.Errorf("delays %q, want %q; log:\n%s", delays, want, log)
	}
	if n := strings.Count(log, "stub: crash\n"); n != crashes {
		t.Errorf("%d crashes in the log, want %d", n, crashes)
	}
	// Each restart waits respawn_delay (1 s) and then its delay.
	starts := len(lines(readFile(filepath.Join(dir, "starts"))))
	bound, spent := 1, 0.0
	for _, d := range []float64{1 + 1, 1 + 2, 1 + 4, 1 + 4, 1 + 4, 1 + 4, 1 + 4, 1 + 4} {
		if spent+d > elapsed {
			break
		}
		spent += d
		bound++
	}
	if starts > bound || starts != crashes+1 {
		t.Errorf("%d starts in %.1fs, want %d, and at most %d with the delays", starts, elapsed, crashes+1, bound)
	}

	// Running longer than GUESTAGENT_RESPAWN_STABLE, then killed: the
	// restart comes without a delay.
	first := stubPid(dir)
	before := uptime()
	testenv.Eventually(t, waitFor, "the stub to have run for 8 s", func() (bool, string) {
		return uptime()-before > 9, ""
	})
	syscall.Kill(-first, syscall.SIGKILL)
	testenv.Eventually(t, waitFor, "the stub to be restarted", func() (bool, string) {
		pid := stubPid(dir)
		return pid != first && pid != 0 && alive(pid), readFile(logFile)
	})
	log = readFile(logFile)
	if !strings.Contains(log, "s after its start; starting it again in 0s\n") {
		t.Errorf("the restart after a stable run was delayed; log:\n%s", log)
	}
	if out, code := root.service("stop"); code != 0 {
		t.Fatalf("stop: exit %d, %s", code, out)
	}
}

// rdConfVars are the variables of Rancher Desktop's conf.d, in the order
// its agent's service passes them, with the flag each becomes:
// ${VAR:+-flag=${VAR}}.
var rdConfVars = []struct{ name, flag string }{
	{"GUESTAGENT_ADMIN_INSTALL", "adminInstall"},
	{"GUESTAGENT_KUBERNETES", "kubernetes"},
	{"GUESTAGENT_DOCKER", "docker"},
	{"GUESTAGENT_CONTAINERD", "containerd"},
	{"GUESTAGENT_K8S_SVC_ADDR", "k8sServiceListenerAddr"},
	{"GUESTAGENT_DEBUG", "debug"},
}

// parseConf reads a conf.d file of KEY="value" lines, as Rancher Desktop
// writes them.
func parseConf(t *testing.T, conf string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, line := range lines(conf) {
		k, v, ok := strings.Cut(line, "=")
		if !ok || len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' {
			t.Fatalf("not KEY=\"value\": %q", line)
		}
		out[k] = v[1 : len(v)-1]
	}
	return out
}

// agentFlags parses args as Rancher Desktop's agent does (Go's flag
// package, with its flags and defaults) and returns every flag's value.
func agentFlags(t *testing.T, args []string) map[string]string {
	t.Helper()
	fs := flag.NewFlagSet("rancher-desktop-guestagent", flag.ContinueOnError)
	for _, b := range []string{"adminInstall", "kubernetes", "docker", "containerd", "debug"} {
		fs.Bool(b, false, "")
	}
	fs.String("k8sServiceListenerAddr", "0.0.0.0", "")
	if err := fs.Parse(args); err != nil {
		t.Fatalf("%q: %v", args, err)
	}
	if fs.NArg() != 0 {
		t.Fatalf("%q: arguments after the flags: %q", args, fs.Args())
	}
	out := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { out[f.Name] = f.Value.String() })
	return out
}

// TestOpenRCServiceTakesRancherDesktopsPlace installs the service as
// Rancher Desktop's, /etc/init.d/rancher-desktop-guestagent, with the
// conf.d files Rancher Desktop writes (testdata/rancher-desktop/, from
// the variables and values of its installGuestAgent: moby without admin
// rights; containerd with them, Kubernetes and debug), a stub at Rancher
// Desktop's binary path and proxies in /etc/environment. The agent gets
// the arguments Rancher Desktop's service would have given (the same
// values for every flag, parsed as its agent parses them), the variables
// of /etc/environment, and logs to rancher-desktop-guestagent.log in
// LOG_DIR, a path with a space in a directory anyone may write (as the
// Windows drive is in WSL); the service writes the rotation of that log,
// which the real logrotate runs.
func TestOpenRCServiceTakesRancherDesktopsPlace(t *testing.T) {
	root := newOpenRCRoot(t)
	logrotate := testenv.Binary(t, "GUESTAGENT_LOGROTATE", "logrotate")
	const service = "rancher-desktop-guestagent"
	root.installAs(service)
	dir := t.TempDir()
	stub := stubAgent(t, dir)
	t.Cleanup(func() {
		if pid := stubPid(dir); pid > 1 {
			syscall.Kill(-pid, syscall.SIGKILL)
		}
	})
	root.writeFile("/usr/local/bin/rancher-desktop-guestagent", readFile(stub), 0o755)
	root.writeFile("/etc/environment", `# written by the desktop app
export http_proxy="http://proxy.example:3128"
HTTPS_PROXY=http://proxy.example:3128
no_proxy='localhost,127.0.0.1'
`, 0o644)

	fixtures, err := filepath.Glob("testdata/rancher-desktop/*.conf")
	if err != nil || len(fixtures) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, fixture := range fixtures {
		t.Run(strings.TrimSuffix(filepath.Base(fixture), ".conf"), func(t *testing.T) {
			conf := readFile(fixture)
			vars := parseConf(t, conf)
			logDir := vars["LOG_DIR"]
			if logDir == "" {
				t.Fatal("the fixture sets no LOG_DIR")
			}
			// The app's log folder exists, as on the Windows drive.
			if err := os.MkdirAll(root.path(logDir), 0o777); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(root.path(logDir), 0o777); err != nil {
				t.Fatal(err)
			}
			root.writeFile("/etc/conf.d/"+service, conf, 0o644)
			os.Remove(filepath.Join(dir, "argv"))
			if out, code := root.serviceNamed(service, "start"); code != 0 {
				t.Fatalf("start: exit %d, %s", code, out)
			}
			testenv.Eventually(t, waitFor, "the agent to start", func() (bool, string) {
				_, err := os.Stat(filepath.Join(dir, "argv"))
				return err == nil, ""
			})

			var rdArgs []string
			for _, v := range rdConfVars {
				if val := vars[v.name]; val != "" {
					rdArgs = append(rdArgs, "-"+v.flag+"="+val)
				}
			}
			got := lines(readFile(filepath.Join(dir, "argv")))
			if g, w := agentFlags(t, got), agentFlags(t, rdArgs); !maps.Equal(g, w) {
				t.Errorf("the agent got %q: flags %v; Rancher Desktop's service passes %q: flags %v", got, g, rdArgs, w)
			}

			env := lines(readFile(filepath.Join(dir, "env")))
			for _, kv := range []string{"http_proxy=http://proxy.example:3128", "HTTPS_PROXY=http://proxy.example:3128", "no_proxy=localhost,127.0.0.1"} {
				if !slices.Contains(env, kv) {
					t.Errorf("the agent's environment lacks %s:\n%s", kv, strings.Join(env, "\n"))
				}
			}

			logFile := logDir + "/" + service + ".log"
			testenv.Eventually(t, waitFor, "the agent's output in LOG_DIR", func() (bool, string) {
				log := readFile(root.path(logFile))
				return strings.Contains(log, "stub: started\n") && strings.Contains(log, "stub: on stderr\n"), log
			})
			rotation := readFile(root.path("/etc/logrotate.d/" + service))
			if !strings.Contains(rotation, `"`+logFile+`" {`) {
				t.Fatalf("/etc/logrotate.d/%s does not name %s:\n%s", service, logFile, rotation)
			}
			state := filepath.Join(dir, "logrotate.state")
			if out, code := root.run(logrotate, "--force", "--state", state, "/etc/logrotate.d/"+service); code != 0 {
				t.Fatalf("logrotate: exit %d, %s", code, out)
			}
			if rotated := readFile(root.path(logFile + ".1")); !strings.Contains(rotated, "stub: started\n") {
				t.Errorf("%s.1 = %q, want the log before rotation", logFile, rotated)
			}
			if log := readFile(root.path(logFile)); log != "" {
				t.Errorf("the log after rotation = %q, want it empty", log)
			}

			if out, code := root.serviceNamed(service, "stop"); code != 0 {
				t.Fatalf("stop: exit %d, %s", code, out)
			}
		})
	}
}

// TestLogrotateCapsTheLogWhenItRuns runs the real logrotate, unforced, as
// cron does, with the shipped rules on a log of its own and a fresh state
// file: a small log stays (its week has not passed), one above 10 MiB is
// rotated at once (maxsize), so each run bounds the log.
func TestLogrotateCapsTheLogWhenItRuns(t *testing.T) {
	testenv.Integration(t)
	logrotate := testenv.Binary(t, "GUESTAGENT_LOGROTATE", "logrotate")
	dir := t.TempDir()
	log := filepath.Join(dir, "guestagent.log")
	shipped := readFile(absPath(t, logrotateFile))
	if !strings.Contains(shipped, "/var/log/guestagent.log {") {
		t.Fatalf("the shipped file does not name /var/log/guestagent.log:\n%s", shipped)
	}
	conf := filepath.Join(dir, "logrotate.conf")
	if err := os.WriteFile(conf, []byte(strings.Replace(shipped, "/var/log/guestagent.log", log, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	run := func() {
		t.Helper()
		if out, err := exec.Command(logrotate, "--state", state, conf).CombinedOutput(); err != nil {
			t.Fatalf("logrotate: %v\n%s", err, out)
		}
	}

	if err := os.WriteFile(log, []byte("a small log\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run()
	if _, err := os.Stat(log + ".1"); err == nil {
		t.Fatal("a small log was rotated before its week")
	}
	if got := readFile(log); got != "a small log\n" {
		t.Fatalf("the small log = %q", got)
	}

	big := strings.Repeat("x", 1023) + "\n"
	f, err := os.OpenFile(log, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range 10*1024 + 1 {
		f.WriteString(big)
	}
	f.Close()
	run()
	fi, err := os.Stat(log + ".1")
	if err != nil {
		t.Fatalf("a log above 10 MiB was not rotated: %v", err)
	}
	if fi.Size() <= 10<<20 {
		t.Errorf("guestagent.log.1 has %d bytes, want the whole log", fi.Size())
	}
	if fi, err := os.Stat(log); err != nil || fi.Size() != 0 {
		t.Errorf("the log after rotation: %v, %v; want it there and empty (copytruncate)", fi, err)
	}
}
