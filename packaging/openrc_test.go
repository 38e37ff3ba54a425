package packaging_test

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// waitFor is how long a step of the service may take before the test fails.
const waitFor = 30 * time.Second

// openrcRoot is a private mount and network namespace where OpenRC
// believes it booted the machine: tmpfs on /run (with OpenRC's state
// directory), /var/log, /etc/init.d, /usr/local/bin and /mnt, and an
// overlay on /etc, seen by nothing outside; its network has only its
// loopback, up. A process sleeping in it keeps it.
type openrcRoot struct {
	t         *testing.T
	openrcRun string
	holder    *exec.Cmd
}

// newOpenRCRoot starts the namespace, or skips (fails under make test)
// when openrc-run, unshare or nsenter is missing or the test is not root.
// It skips under go test -short.
func newOpenRCRoot(t *testing.T) *openrcRoot {
	t.Helper()
	testenv.Integration(t)
	if os.Geteuid() != 0 {
		testenv.Missing(t, "root (to mount OpenRC's state directory in a private namespace)")
	}
	openrcRun := testenv.Binary(t, "GUESTAGENT_OPENRC_RUN", "openrc-run")
	testenv.Binary(t, "GUESTAGENT_UNSHARE", "unshare")
	testenv.Binary(t, "GUESTAGENT_NSENTER", "nsenter")
	testenv.Binary(t, "GUESTAGENT_IP", "ip")

	// /etc is an overlay whose changes stay in the namespace, so that the
	// script and its settings go where they are installed; the tmpfs on
	// /etc/init.d leaves this machine's own services out, the one on
	// /usr/local/bin its programs (the binary's place in the image), and
	// the one on /mnt gives the desktop app's log folder a place. Then the
	// directories OpenRC's boot creates in its state directory, and the
	// softlevel file that says it booted.
	setup := `set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/etc-upper /run/etc-work
mount -t overlay -o lowerdir=/etc,upperdir=/run/etc-upper,workdir=/run/etc-work overlay /etc
mount -t tmpfs -o mode=0755 tmpfs /etc/init.d
mkdir -p /etc/conf.d
mount -t tmpfs -o mode=0755 tmpfs /var/log
mount -t tmpfs -o mode=0755 tmpfs /usr/local/bin
mount -t tmpfs -o mode=0755 tmpfs /mnt
ip link set lo up
mkdir /run/openrc
cd /run/openrc
mkdir daemons exclusive failed hotplugged inactive init.d options scheduled started starting stopping tmp wasinactive
echo default >softlevel
echo ready
exec sleep infinity
`
	holder := exec.Command("unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", setup)
	holder.Stderr = os.Stderr
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	r := &openrcRoot{t: t, openrcRun: openrcRun, holder: holder}
	t.Cleanup(r.close)
	if line, err := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		t.Fatalf("setting up the namespace: %q, %v", line, err)
	}
	return r
}

// close stops whatever supervise-daemon still runs in the namespace (a
// test that failed half-way), then the namespace.
func (r *openrcRoot) close() {
	pidfiles, _ := filepath.Glob(r.path("/run/supervise-*.pid"))
	for _, f := range pidfiles {
		if pid, err := strconv.Atoi(strings.TrimSpace(readFile(f))); err == nil && pid > 1 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	r.holder.Process.Kill()
	r.holder.Wait()
}

// path returns the path outside the namespace of path inside it.
func (r *openrcRoot) path(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", r.holder.Process.Pid, path)
}

// run runs argv in the namespaces and returns its combined output and
// exit code.
func (r *openrcRoot) run(argv ...string) (string, int) {
	r.t.Helper()
	nsenter := append([]string{"-t", strconv.Itoa(r.holder.Process.Pid), "-m", "-n", "--"}, argv...)
	out, err := exec.Command("nsenter", nsenter...).CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(out), exit.ExitCode()
	}
	if err != nil {
		r.t.Fatalf("%q: %v", argv, err)
	}
	return string(out), 0
}

// install writes the service script to /etc/init.d/guestagent.
func (r *openrcRoot) install() { r.installAs("guestagent") }

// installAs writes the service script to /etc/init.d/NAME.
func (r *openrcRoot) installAs(name string) {
	r.t.Helper()
	err := os.WriteFile(r.path("/etc/init.d/"+name), []byte(readFile(absPath(r.t, initScript))), 0o755)
	if err != nil {
		r.t.Fatal(err)
	}
}

// service runs /etc/init.d/guestagent with a command (start, stop,
// status...).
func (r *openrcRoot) service(command string) (string, int) {
	r.t.Helper()
	return r.serviceNamed("guestagent", command)
}

// serviceNamed runs /etc/init.d/NAME with a command.
func (r *openrcRoot) serviceNamed(name, command string) (string, int) {
	r.t.Helper()
	return r.run(r.openrcRun, "/etc/init.d/"+name, command)
}

// writeFile writes a file at path in the namespace.
func (r *openrcRoot) writeFile(path, content string, mode os.FileMode) {
	r.t.Helper()
	if err := os.WriteFile(r.path(path), []byte(content), mode); err != nil {
		r.t.Fatal(err)
	}
}

// stubAgent writes a program in dir that stands in for guestagent: it
// records its arguments in dir/argv, its environment in dir/env and its
// pid in dir/pid (each written whole, by rename) and appends a line to
// dir/starts, prints a line on standard output and one on standard error,
// prints "stub: HUP" on SIGHUP, and on SIGTERM prints "stub: TERM" and
// exits. While dir/crashes holds a number above 0, it counts it down and
// exits at once with 1 instead, printing "stub: crash".
func stubAgent(t *testing.T, dir string) string {
	t.Helper()
	stub := filepath.Join(dir, "guestagent-stub")
	script := fmt.Sprintf(`#!/bin/sh
d=%s
echo start >>"$d/starts"
if [ -e "$d/crashes" ] && n=$(cat "$d/crashes") && [ "$n" -gt 0 ]; then
	echo $((n - 1)) >"$d/crashes"
	echo "stub: crash"
	exit 1
fi
printf '%%s\n' "$@" >"$d/argv.new" && mv "$d/argv.new" "$d/argv"
env >"$d/env.new" && mv "$d/env.new" "$d/env"
echo $$ >"$d/pid.new" && mv "$d/pid.new" "$d/pid"
echo "stub: started"
echo "stub: on stderr" >&2
trap 'echo "stub: HUP"' HUP
trap 'echo "stub: TERM"; kill $s; exit 0' TERM
# A trapped signal ends wait, not the sleep: wait for the same one again.
sleep 3600 & s=$!
while :; do
	wait $s
	kill -0 $s 2>/dev/null || { sleep 3600 & s=$!; }
done
`, quote(dir))
	if err := os.WriteFile(stub, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return stub
}

// readFile returns the contents of path, or "" when it cannot be read.
func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// stubPid returns the pid the stub last recorded, 0 if none.
func stubPid(dir string) int {
	pid, _ := strconv.Atoi(strings.TrimSpace(readFile(filepath.Join(dir, "pid"))))
	return pid
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// TestOpenRCServiceRunsTheAgent runs the service script under the real
// openrc-run and supervise-daemon, with a stub in place of the agent:
// settings OpenRC reads from conf.d become the agent's arguments, bad
// settings stop the start, supervise-daemon restarts a killed agent, the
// output goes to /var/log/guestagent.log and the shipped logrotate file
// rotates it while the agent runs, and stop sends SIGTERM.
func TestOpenRCServiceRunsTheAgent(t *testing.T) {
	root := newOpenRCRoot(t)
	logrotate := testenv.Binary(t, "GUESTAGENT_LOGROTATE", "logrotate")

	root.install()
	dir := t.TempDir()
	stub := stubAgent(t, dir)
	t.Cleanup(func() {
		// A stub left by a test that failed half-way, with its sleep.
		if pid := stubPid(dir); pid > 1 {
			syscall.Kill(-pid, syscall.SIGKILL)
		}
	})
	writeConf := func(conf string) {
		t.Helper()
		conf = "GUESTAGENT_BINARY=" + quote(stub) + "\nrespawn_delay=1\n" + conf
		if err := os.WriteFile(root.path("/etc/conf.d/guestagent"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	logFile := root.path("/var/log/guestagent.log")

	// Bad settings: start fails, naming the value, and nothing runs.
	writeConf("GUESTAGENT_DOCKER=yes\n")
	if out, code := root.service("start"); code == 0 || !strings.Contains(out, `"yes"`) {
		t.Fatalf("start with GUESTAGENT_DOCKER=yes: exit %d, %s", code, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "argv")); err == nil {
		t.Fatal("the agent ran with GUESTAGENT_DOCKER=yes")
	}
	if out, code := root.service("status"); code != 3 {
		t.Fatalf("status after a failed start: exit %d (want 3, stopped), %s", code, out)
	}

	// The desktop app's settings, and extra arguments with a space.
	writeConf(`GUESTAGENT_ADMIN_INSTALL=false
GUESTAGENT_KUBERNETES=true
GUESTAGENT_DOCKER=true
GUESTAGENT_CONTAINERD=false
GUESTAGENT_DEBUG=false
GUESTAGENT_K8S_SVC_ADDR=127.0.0.1
GUESTAGENT_EXTRA_ARGS="--statusAddr=127.0.0.1:9901 '--dockerHost=unix:///run/a b.sock'"
`)
	want := []string{
		"-adminInstall=false", "-kubernetes", "-docker", "-containerd=false",
		"-k8sServiceListenerAddr=127.0.0.1",
		"--statusAddr=127.0.0.1:9901", "--dockerHost=unix:///run/a b.sock",
	}
	if out, code := root.service("checkconfig"); code != 0 || !strings.Contains(out, stub+" '-adminInstall=false'") {
		t.Fatalf("checkconfig: exit %d, %s", code, out)
	}
	if out, code := root.service("start"); code != 0 {
		t.Fatalf("start: exit %d, %s", code, out)
	}
	testenv.Eventually(t, waitFor, "the agent's arguments", func() (bool, string) {
		got := lines(readFile(filepath.Join(dir, "argv")))
		return slices.Equal(got, want), fmt.Sprintf("%q, want %q", got, want)
	})
	testenv.Eventually(t, waitFor, "both output streams in the log", func() (bool, string) {
		log := readFile(logFile)
		return strings.Contains(log, "stub: started\n") && strings.Contains(log, "stub: on stderr\n"), log
	})
	if out, code := root.service("status"); code != 0 {
		t.Fatalf("status: exit %d (want 0, started), %s", code, out)
	}

	// A killed agent is started again, with the same arguments.
	first := stubPid(dir)
	if first == 0 {
		t.Fatal("the stub recorded no pid")
	}
	os.Remove(filepath.Join(dir, "argv"))
	syscall.Kill(-first, syscall.SIGKILL) // its session: the stub and its sleep
	testenv.Eventually(t, waitFor, "supervise-daemon to restart the agent", func() (bool, string) {
		pid := stubPid(dir)
		return pid != first && pid != 0 && alive(pid), fmt.Sprintf("pid %d (the killed one was %d)", pid, first)
	})
	testenv.Eventually(t, waitFor, "the restarted agent's arguments", func() (bool, string) {
		got := lines(readFile(filepath.Join(dir, "argv")))
		return slices.Equal(got, want), fmt.Sprintf("%q, want %q", got, want)
	})

	// Rotation with the shipped file, while the agent writes: the old lines
	// move to guestagent.log.1 and the agent's next line starts the new,
	// empty log (supervise-daemon appends, so no hole is left behind).
	testenv.Eventually(t, waitFor, "the restarted agent's output", func() (bool, string) {
		log := readFile(logFile)
		return strings.Count(log, "stub: started\n") == 2, log
	})
	conf := filepath.Join(dir, "logrotate.conf")
	if err := os.WriteFile(conf, []byte(readFile(absPath(t, logrotateFile))), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code := root.run(logrotate, "--force", "--state", filepath.Join(dir, "logrotate.state"), conf); code != 0 {
		t.Fatalf("logrotate: exit %d, %s", code, out)
	}
	if rotated := readFile(root.path("/var/log/guestagent.log.1")); strings.Count(rotated, "stub: started\n") != 2 {
		t.Fatalf("guestagent.log.1 = %q, want the lines before rotation", rotated)
	}
	syscall.Kill(stubPid(dir), syscall.SIGHUP)
	testenv.Eventually(t, waitFor, "the agent's next line to start the rotated log", func() (bool, string) {
		log := readFile(logFile)
		return log == "stub: HUP\n", fmt.Sprintf("%q", log)
	})

	// Stop sends SIGTERM (the agent then removes what it exposed) and
	// waits for the agent.
	last := stubPid(dir)
	if out, code := root.service("stop"); code != 0 {
		t.Fatalf("stop: exit %d, %s", code, out)
	}
	testenv.Eventually(t, waitFor, "the agent to exit on SIGTERM", func() (bool, string) {
		log := readFile(logFile)
		return !alive(last) && strings.Contains(log, "stub: TERM\n"), fmt.Sprintf("pid %d alive: %v; log %q", last, alive(last), log)
	})
	if out, code := root.service("status"); code != 3 {
		t.Fatalf("status after stop: exit %d (want 3, stopped), %s", code, out)
	}
}

// depinfo matches a line of OpenRC's dependency cache: depinfo_N_service
// or depinfo_N_TYPE_M and its value.
var depinfo = regexp.MustCompile(`^depinfo_(\d+)_([a-z]+)(?:_\d+)?='(.*)'$`)

// TestOpenRCOrdersTheServiceAfterNetworkAndEngines installs the script as
// /etc/init.d/guestagent, has OpenRC build its dependency cache, and reads
// what OpenRC understood: a soft dependency on net and a start after the
// firewall and the container engines, and no hard dependency, so the agent
// starts where an engine is not installed.
func TestOpenRCOrdersTheServiceAfterNetworkAndEngines(t *testing.T) {
	root := newOpenRCRoot(t)
	root.install()
	if out, code := root.service("describe"); code != 0 || !strings.Contains(out, "Exposes container and Kubernetes ports") {
		t.Fatalf("describe: exit %d, %s", code, out)
	}
	// Asking for the hard dependencies makes openrc-run build the cache.
	if out, code := root.service("ineed"); code != 0 {
		t.Fatalf("ineed: exit %d, %s", code, out)
	}
	tree := readFile(root.path("/run/openrc/deptree"))
	services := map[string]string{}
	deps := map[string]map[string][]string{}
	for _, line := range lines(tree) {
		m := depinfo.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if m[2] == "service" {
			services[m[1]] = m[3]
			continue
		}
		if deps[m[1]] == nil {
			deps[m[1]] = map[string][]string{}
		}
		deps[m[1]][m[2]] = append(deps[m[1]][m[2]], m[3])
	}
	var ours map[string][]string
	for n, name := range services {
		if name == "guestagent" {
			ours = deps[n]
		}
	}
	if ours == nil {
		t.Fatalf("guestagent is not in OpenRC's dependency cache:\n%s", tree)
	}
	if len(ours["ineed"]) != 0 {
		t.Errorf("hard dependencies %q, want none", ours["ineed"])
	}
	if !slices.Equal(ours["iuse"], []string{"net"}) {
		t.Errorf("use %q, want [net]", ours["iuse"])
	}
	for _, s := range []string{"network-online", "firewall", "docker", "containerd", "k3s"} {
		if !slices.Contains(ours["iafter"], s) {
			t.Errorf("after %q, want it to hold %s", ours["iafter"], s)
		}
	}
}
