package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
)

var update = flag.Bool("update", false, "rewrite the golden files of the command outputs")

// goldenStatus is a status with one port of each kind: exposed at both
// sinks, retrying at one, held by another party, in conflict, unsupported,
// plus a refused port and a sink whose peer is down.
func goldenStatus(now time.Time) core.Status {
	lo := netip.MustParseAddr("127.0.0.1")
	any4 := netip.IPv4Unspecified()
	return core.Status{
		Ports: []core.PortStatus{
			{Protocol: core.TCP, HostIP: lo, HostPort: 8080,
				Claims: []core.ClaimStatus{{Key: core.Key{Source: "docker", ID: "4f1c0a7e9b2d4c3a8e6f5a1b2c3d4e5f"}, ContainerPort: 80}},
				Sinks:  []core.PortAtSink{{Sink: "host-switch", State: core.PortExposed}, {Sink: "wsl-proxy", State: core.PortExposed}}},
			{Protocol: core.TCP, HostIP: any4, HostPort: 30080,
				Claims: []core.ClaimStatus{{Key: core.Key{Source: "kubernetes", ID: "2d5a7c1e-0b4f-4e8a-9c3d-6f1e2a3b4c5d"}, ContainerPort: 30080}, {Key: core.Key{Source: "iptables", ID: "tcp/30080"}, ContainerPort: 30080}},
				Sinks: []core.PortAtSink{
					{Sink: "host-switch", State: core.PortRetrying, Error: "expose 0.0.0.0:30080/tcp: HTTP 500: listen tcp 0.0.0.0:30080: bind: address already in use", Since: now.Add(-12 * time.Second), NextRetry: now.Add(4 * time.Second)},
					{Sink: "wsl-proxy", State: core.PortExposed}}},
			{Protocol: core.TCP, HostIP: lo, HostPort: 6443,
				Claims: []core.ClaimStatus{{Key: core.Key{Source: "k8s-api", ID: "api-server"}, ContainerPort: 6443}},
				Sinks:  []core.PortAtSink{{Sink: "wsl-proxy", State: core.PortExposed}}},
			{Protocol: core.TCP, HostIP: lo, HostPort: 9000,
				Claims: []core.ClaimStatus{
					{Key: core.Key{Source: "static", ID: "a"}, ContainerPort: 80, ConnectAddrs: []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}},
					{Key: core.Key{Source: "static", ID: "b"}, ContainerPort: 80, ConnectAddrs: []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.3:80"}}, Conflict: "another backend than static/a, which holds the port"}},
				Sinks: []core.PortAtSink{{Sink: "host-switch", State: core.PortConflict, Error: "expose 127.0.0.1:9000/tcp: already forwarded to 192.168.127.9:80, not 192.168.127.2:9000"}, {Sink: "wsl-proxy", State: core.PortExposed}}},
			{Protocol: core.TCP, HostIP: netip.IPv6Unspecified(), HostPort: 8081,
				Claims: []core.ClaimStatus{{Key: core.Key{Source: "docker", ID: "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"}, ContainerPort: 80}},
				Sinks:  []core.PortAtSink{{Sink: "host-switch", State: core.PortUnsupported, Error: "[::]:8081->80/tcp: the forwarder API is IPv4 only"}, {Sink: "wsl-proxy", State: core.PortExposed, Held: "0.0.0.0:8081"}}},
		},
		Refused: []core.Refusal{{Key: core.Key{Source: "docker", ID: "4f1c0a7e9b2d4c3a8e6f5a1b2c3d4e5f"}, Port: core.Port{Protocol: core.TCP, ContainerPort: 443, HostIP: lo, HostPort: 443}, Reason: "host port 443 is privileged (< 1024) and not used in non-admin mode"}},
		Notes: []core.Note{{Key: core.Key{Source: "kubernetes", ID: "7c0f3a2e-1d4b-4c5a-9e8f-0a1b2c3d4e5f"}, What: "Kubernetes service default/web",
			Ports: []core.Port{{Protocol: core.TCP, ContainerPort: 80}}, Reason: "it is of type ClusterIP; only NodePort and LoadBalancer services are exposed on the host"}},
		Sources: []core.SourceStatus{
			{Name: "docker", Synced: true},
			{Name: "kubernetes"},
			{Name: "sockets", Synced: true, Watching: "sock_diag dump on eBPF wake-ups (TCP listeners, inet_sock_set_state tracepoint) and every 1s"},
		},
		Sinks: []core.SinkStatus{
			{Name: "host-switch", Exposed: 1, Failing: 1},
			{Name: "wsl-proxy", Exposed: 5, PeerDown: true, LastError: "dial unix /run/wsl-proxy.sock: connect: no such file or directory"},
		},
	}
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("..", "..", "testdata", "cli", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run %s -update to write it)", err, t.Name())
	}
	if got != string(want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

func TestStatusTableGolden(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, wide := range []bool{false, true} {
		var b bytes.Buffer
		renderStatus(&b, goldenStatus(now), wide, now)
		golden(t, map[bool]string{false: "status.golden", true: "status-wide.golden"}[wide], b.String())
	}
}

func TestExplainGolden(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	st := goldenStatus(now)
	for _, q := range []struct {
		name  string
		proto core.Protocol
		port  uint16
	}{
		{"explain-30080.golden", core.TCP, 30080},
		{"explain-9000.golden", core.TCP, 9000},
		{"explain-443.golden", core.TCP, 443},
		{"explain-80.golden", core.TCP, 80},
		{"explain-8080-udp.golden", core.UDP, 8080},
	} {
		golden(t, q.name, strings.Join(explain(st, q.proto, q.port).sentences(now), "\n")+"\n")
	}
}

func TestWatchEventsFromStatusChanges(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	before := goldenStatus(now)
	after := goldenStatus(now)
	after.Ports[1].Sinks[0] = core.PortAtSink{Sink: "host-switch", State: core.PortExposed}              // recovered
	after.Ports[0].Sinks = after.Ports[0].Sinks[1:]                                                      // removed from host-switch
	after.Ports[3].Sinks[0] = core.PortAtSink{Sink: "host-switch", State: core.PortRetrying, Error: "x"} // failed
	after.Refused = append(after.Refused, core.Refusal{Key: core.Key{Source: "static", ID: "c"}, Port: core.Port{Protocol: core.UDP, HostPort: 53}, Reason: "privileged"})
	after.Sinks[1].PeerDown = false
	var got []string
	for _, ev := range diffEvents(before, after, now) {
		got = append(got, fmt.Sprintf("%s %s %s", ev.Event, ev.port(), ev.Sink))
	}
	want := []string{
		"recovered tcp 0.0.0.0:30080 host-switch",
		"failed tcp 127.0.0.1:9000 host-switch",
		"removed tcp 127.0.0.1:8080 host-switch",
		"refused udp 0.0.0.0:53 ",
		"peer-up  wsl-proxy",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if evs := diffEvents(before, before, now); len(evs) != 0 {
		t.Errorf("no change gave events %+v", evs)
	}
}

// TestCommandsAgainstARunningAgent runs the agent (non-admin mode, the
// static source, host-switch pointed at a port nobody listens on, and
// stdout) and asks it with status, explain and watch over its control
// socket.
func TestCommandsAgainstARunningAgent(t *testing.T) {
	sock := controlSocket(t)
	file := filepath.Join(t.TempDir(), "static.json")
	write := func(body string) {
		t.Helper()
		if err := os.WriteFile(file+".tmp", []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"mappings":[
		{"id":"web","ports":[{"protocol":"tcp","containerPort":80,"hostIP":"0.0.0.0","hostPort":18080},{"protocol":"tcp","containerPort":443,"hostPort":443}]},
		{"id":"a","ports":[{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":19000}],"connectAddrs":[{"network":"tcp","addr":"198.18.0.2:80"}]},
		{"id":"b","ports":[{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":19000}],"connectAddrs":[{"network":"tcp","addr":"198.18.0.3:80"}]}]}`)
	down := fmt.Sprintf("http://127.0.0.1:%d", testenv.FreePort(t))
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start := func() chan int {
		done := make(chan int, 1)
		var out, errOut syncBuffer
		go func() {
			done <- run(ctx, []string{"--sources=static", "--staticFile=" + file, "--staticPollInterval=50ms",
				"--sinks=host-switch,stdout", "--hostSwitchURL=" + down, "--stateDir=" + t.TempDir(), "--controlSocket=" + sock}, &out, &errOut)
		}()
		return done
	}
	done := start()
	cmd := func(args ...string) (int, string, string) {
		t.Helper()
		var out, errOut syncBuffer
		code := run(t.Context(), append(args, "--socket="+sock), &out, &errOut)
		return code, out.String(), errOut.String()
	}
	var out string
	testenv.Eventually(t, 15*time.Second, "status to show the ports and the down peer", func() (bool, string) {
		code, o, e := cmd("status")
		out = o
		return code == 0 && strings.Contains(o, "127.0.0.1:18080") && strings.Contains(o, "exposed") && strings.Contains(o, "host-switch: peer unreachable"), o + e
	})
	for _, want := range []string{
		"PROTO", "HOST ADDRESS", "CLAIMED BY", "STDOUT", "HOST-SWITCH",
		"static/web", "exposed",
		"REFUSED", "443", "privileged",
		"CONFLICTS", "static/b", "another backend than static/a",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	code, js, _ := cmd("status", "--json")
	var st core.Status
	if code != 0 || json.Unmarshal([]byte(js), &st) != nil || len(st.Ports) != 2 {
		t.Errorf("status --json: exit %d, %d ports:\n%s", code, len(st.Ports), js)
	}
	code, ex, _ := cmd("explain", "443")
	if code != 0 || !strings.Contains(ex, "was not exposed: host port 443 is privileged") {
		t.Errorf("explain 443: exit %d:\n%s", code, ex)
	}
	code, ex, _ = cmd("explain", "19000/tcp")
	if code != 0 || !strings.Contains(ex, "in conflict") || !strings.Contains(ex, "stdout holds it") || !strings.Contains(ex, "peer is unreachable") {
		t.Errorf("explain 19000/tcp: exit %d:\n%s", code, ex)
	}
	code, ex, _ = cmd("explain", "80")
	if code != 0 || !strings.Contains(ex, "Nothing claims host port 80/tcp") || !strings.Contains(ex, "publishes port 80 on host port 127.0.0.1:18080") {
		t.Errorf("explain 80: exit %d:\n%s", code, ex)
	}

	// watch: the current state, a change, the agent going and coming back.
	var wout, werr syncBuffer
	wctx, wcancel := context.WithCancel(t.Context())
	wdone := make(chan int, 1)
	go func() { wdone <- run(wctx, []string{"watch", "--json", "--socket=" + sock}, &wout, &werr) }()
	events := func() []watchEvent {
		var evs []watchEvent
		for _, l := range strings.Split(strings.TrimSpace(wout.String()), "\n") {
			var ev watchEvent
			if json.Unmarshal([]byte(l), &ev) == nil {
				evs = append(evs, ev)
			}
		}
		return evs
	}
	has := func(event, port string) func() (bool, string) {
		return func() (bool, string) {
			for _, ev := range events() {
				if ev.Event == event && strings.HasSuffix(ev.port(), port) {
					return true, ""
				}
			}
			return false, wout.String() + werr.String()
		}
	}
	testenv.Eventually(t, 10*time.Second, "the current state", has(evCurrent, ":18080"))
	write(`{"mappings":[{"id":"web","ports":[{"protocol":"tcp","containerPort":80,"hostIP":"0.0.0.0","hostPort":18081}]}]}`)
	testenv.Eventually(t, 10*time.Second, "an added event", has(evAdded, ":18081"))
	testenv.Eventually(t, 10*time.Second, "a removed event", has(evRemoved, ":18080"))
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("agent exit %d", code)
	}
	testenv.Eventually(t, 10*time.Second, "the watch to notice", func() (bool, string) {
		return strings.Contains(wout.String(), `"event":"disconnected"`), wout.String()
	})
	ctx, cancel = context.WithCancel(t.Context())
	defer cancel()
	done = start()
	testenv.Eventually(t, 15*time.Second, "the watch to reconnect", func() (bool, string) {
		return strings.Contains(wout.String(), `"event":"reconnected"`), wout.String()
	})
	wcancel()
	<-wdone
	cancel()
	<-done

	// No agent: a clear message and a non-zero exit.
	code, _, e := cmd("status")
	if code == 0 || !strings.Contains(e, "no agent answers on "+sock) {
		t.Errorf("status without an agent: exit %d, %q", code, e)
	}
}

// TestControlSocketIsRootOnly checks that a user other than root cannot
// reach the control socket.
func TestControlSocketIsRootOnly(t *testing.T) {
	testenv.Integration(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a command as another user")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		testenv.Missing(t, "setpriv (util-linux)")
	}
	dir, err := os.MkdirTemp("", "ga-bin")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "guestagent")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	sock := controlSocket(t)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	var out, errOut syncBuffer
	go func() {
		done <- run(ctx, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--stateDir=" + t.TempDir(), "--controlSocket=" + sock}, &out, &errOut)
	}()
	defer func() { cancel(); <-done }()
	testenv.Eventually(t, 10*time.Second, "the agent to answer root", func() (bool, string) {
		o, err := exec.Command(bin, "status", "--socket="+sock).CombinedOutput()
		return err == nil, string(o)
	})
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	if di, err := os.Stat(filepath.Dir(sock)); err != nil || di.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v (%v), want 0700", di.Mode(), err)
	}
	o, err := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", bin, "status", "--socket="+sock).CombinedOutput()
	if err == nil {
		t.Fatalf("a user other than root read the status:\n%s", o)
	}
	if !strings.Contains(string(o), "permission denied") {
		t.Errorf("want a permission error, got:\n%s", o)
	}
}

// TestCommandsWithDocker asks an agent fed by a real dockerd about a
// container's exposed port and its refused privileged port. The sockets
// source reads dockerd's namespace too, where docker-proxy listens on the
// published ports: the port is exposed once, claimed by the docker source
// alone.
func TestCommandsWithDocker(t *testing.T) {
	testenv.Integration(t)
	if testing.Short() {
		t.Skip("starts dockerd")
	}
	d, err := dockerdtest.Start(t.TempDir())
	if err != nil {
		testenv.Missing(t, "dockerd ("+err.Error()+")")
	}
	defer d.Close()
	port := testenv.FreePort(t)
	id, err := d.Docker("run", "-d", "-p", fmt.Sprintf("127.0.0.1:%d:80", port), "-p", "80:80", dockerdtest.WebImage)
	if err != nil {
		t.Fatal(err)
	}
	id = strings.TrimSpace(id)
	defer func() { _ = d.RemoveAll([]string{id}) }()
	sock := controlSocket(t)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	var out, errOut syncBuffer
	go func() {
		done <- run(ctx, []string{"--docker", "--dockerHost=" + d.Host, "--dockerLoopbackNAT=false", "--sinks=stdout",
			"--sockets", "--socketsNetns=/var/run/netns/" + d.Netns, "--socketsRelayAddr=",
			"--stateDir=" + t.TempDir(), "--controlSocket=" + sock}, &out, &errOut)
	}()
	defer func() { cancel(); <-done }()
	cmd := func(args ...string) (int, string) {
		var o, e syncBuffer
		code := run(t.Context(), append(args, "--socket="+sock), &o, &e)
		return code, o.String() + e.String()
	}
	testenv.Eventually(t, 30*time.Second, "the container in status", func() (bool, string) {
		code, o := cmd("status")
		return code == 0 && strings.Contains(o, fmt.Sprintf("127.0.0.1:%d", port)) && strings.Contains(o, "docker/"+id[:12]) && strings.Contains(o, "REFUSED"), o
	})
	// A plain listener in the namespace, opened after the container: once
	// the sockets source reports it, it has read the namespace with
	// docker-proxy in it.
	plain := testenv.FreePort(t)
	argv := testenv.InNetns(d.Netns, "busybox", "nc", "-l", "-p", fmt.Sprint(plain))
	nc := exec.Command(argv[0], argv[1:]...)
	if err := nc.Start(); err != nil {
		testenv.Missing(t, "busybox nc ("+err.Error()+")")
	}
	defer func() { _ = nc.Process.Kill(); _ = nc.Wait() }()
	var st core.Status
	testenv.Eventually(t, 30*time.Second, "the sockets source to report the plain listener", func() (bool, string) {
		code, js := cmd("status", "--json")
		st = core.Status{}
		if code != 0 || json.Unmarshal([]byte(js), &st) != nil {
			return false, js
		}
		for _, ps := range st.Ports {
			if int(ps.HostPort) == plain && len(ps.Claims) == 1 && ps.Claims[0].Key.Source == "sockets" {
				return true, ""
			}
		}
		return false, js
	})
	for _, ps := range st.Ports {
		if int(ps.HostPort) == port && (len(ps.Claims) != 1 || ps.Claims[0].Key.Source != "docker") {
			t.Errorf("port %d has claims %+v, want the docker source's alone", port, ps.Claims)
		}
	}
	// The status says how each source watches: the sockets source by eBPF
	// wake-ups, which load here (the tests run as root).
	var watching string
	for _, s := range st.Sources {
		if s.Name == "sockets" {
			watching = s.Watching
		}
	}
	if !strings.Contains(watching, "eBPF wake-ups (TCP listeners") {
		t.Errorf("sockets source watching %q, want eBPF wake-ups; sources %+v", watching, st.Sources)
	}
	if code, o := cmd("status"); code != 0 || !strings.Contains(o, "\nSOURCES\n") || !regexp.MustCompile(`(?m)^docker +synced$`).MatchString(o) {
		t.Errorf("status lacks the sources:\n%s", o)
	}
	code, o := cmd("explain", fmt.Sprint(port))
	if code != 0 || !strings.Contains(o, "Docker container "+id) || !strings.Contains(o, "stdout holds it") {
		t.Errorf("explain %d: exit %d:\n%s", port, code, o)
	}
	code, o = cmd("explain", "80/tcp")
	if code != 0 || !strings.Contains(o, "was not exposed: host port 80 is privileged") {
		t.Errorf("explain 80/tcp: exit %d:\n%s", code, o)
	}
}
