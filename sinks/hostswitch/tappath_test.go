package hostswitch_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// tapPath is the network-tunnel path end to end, with no VM: gvproxy with
// its virtual network on a unix socket, gvforwarder in a network namespace
// of the test's own, on a tap device with the guest's address and MAC, and
// the sink reaching the API at the gateway, http://192.168.127.1:80, from
// inside that namespace. A restarted gvproxy has a new network stack behind
// the same gateway address, as host-switch has when the desktop app
// restarts it.
type tapPath struct {
	*gvproxyProc
	ns  string
	fwd *exec.Cmd
	log string
}

// gvproxyProc is gvproxy with the default virtual network and no forwards
// of its own, its network on a unix socket (for gvforwarder) and its
// services API on loopback.
type gvproxyProc struct {
	t       testing.TB
	bin     string
	dir     string
	apiPort int
	cmd     *exec.Cmd
	upAt    time.Time // when the API last accepted a connection after Start
}

// startGvproxy runs gvproxy until the test ends.
func startGvproxy(t testing.TB) *gvproxyProc {
	t.Helper()
	g := &gvproxyProc{
		t:       t,
		bin:     testenv.Binary(t, "GUESTAGENT_GVPROXY", "gvproxy"),
		dir:     t.TempDir(),
		apiPort: testenv.FreePort(t),
	}
	g.Start()
	t.Cleanup(g.Stop)
	return g
}

// startTapPath sets up the path and waits until the guest reaches the API.
func startTapPath(t testing.TB) *tapPath {
	t.Helper()
	forwarder := testenv.Binary(t, "GUESTAGENT_GVFORWARDER", "gvforwarder")
	p := &tapPath{gvproxyProc: startGvproxy(t), ns: testenv.Netns(t)}
	testenv.RunIn(t, p.ns, "ip", "tuntap", "add", "tap0", "mode", "tap")
	p.configureTap()
	p.log = filepath.Join(p.dir, "gvforwarder.log")

	argv := testenv.InNetns(p.ns, forwarder, "-url", "unix://"+p.sock(), "-iface", "tap0", "-preexisting", "-stop-if-exist", "")
	log, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	p.fwd = exec.Command(argv[0], argv[1:]...)
	p.fwd.Stdout, p.fwd.Stderr = log, log
	if err := p.fwd.Start(); err != nil {
		t.Fatalf("starting gvforwarder: %v", err)
	}
	t.Cleanup(func() {
		_ = p.fwd.Process.Kill()
		_ = p.fwd.Wait()
	})
	p.waitGuest()
	return p
}

func (g *gvproxyProc) sock() string { return filepath.Join(g.dir, "gv.sock") }

// URL is the API's address as the guest reaches it.
func (p *tapPath) URL() string { return hostswitch.DefaultBaseURL }

// LoopbackURL is gvproxy's services API (the forwarder API too) on this
// machine's loopback.
func (g *gvproxyProc) LoopbackURL() string { return fmt.Sprintf("http://127.0.0.1:%d", g.apiPort) }

// Start starts gvproxy (again, after Stop) and waits for its API on
// loopback, noting when it first accepts a connection.
func (g *gvproxyProc) Start() {
	g.t.Helper()
	_ = os.Remove(g.sock())
	conf := filepath.Join(g.dir, "gvproxy.yaml")
	text := fmt.Sprintf("listen:\n  - unix://%s\nservices: tcp://127.0.0.1:%d\n", g.sock(), g.apiPort) +
		"stack:\n  mtu: 1500\n  subnet: 192.168.127.0/24\n  gatewayIP: 192.168.127.1\n  gatewayMacAddress: 5a:94:ef:e4:0c:dd\n" +
		"  dhcpStaticLeases:\n    192.168.127.2: 5a:94:ef:e4:0c:ee\n"
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		g.t.Fatal(err)
	}
	logPath := filepath.Join(g.dir, "gvproxy.log")
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		g.t.Fatal(err)
	}
	defer log.Close()
	g.cmd = exec.Command(g.bin, "-config", conf)
	g.cmd.Stdout, g.cmd.Stderr = log, log
	if err := g.cmd.Start(); err != nil {
		g.t.Fatalf("starting gvproxy: %v", err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", g.apiPort)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			g.upAt = time.Now()
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logPath)
			g.t.Fatalf("gvproxy API did not come up: %v\n%s", err, out)
		}
		time.Sleep(time.Millisecond)
	}
}

// Pid is the running gvproxy's process id.
func (g *gvproxyProc) Pid() int { return g.cmd.Process.Pid }

// configureTap gives tap0 the guest's MAC and address and brings it up.
func (p *tapPath) configureTap() {
	p.t.Helper()
	for _, argv := range [][]string{
		{"ip", "link", "set", "tap0", "address", "5a:94:ef:e4:0c:ee"},
		{"ip", "addr", "add", hostswitch.DefaultGuestIP + "/24", "dev", "tap0"},
		{"ip", "link", "set", "tap0", "up"},
	} {
		testenv.RunIn(p.t, p.ns, argv...)
	}
}

// tapIndex is tap0's interface index, or 0 while there is none.
func (p *tapPath) tapIndex() int {
	argv := testenv.InNetns(p.ns, "ip", "-o", "link", "show", "tap0")
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	if err != nil {
		return 0
	}
	var index int
	if _, err := fmt.Sscanf(string(out), "%d:", &index); err != nil {
		return 0
	}
	return index
}

// Restart restarts gvproxy behind the same gateway address. gvforwarder
// dials it again within a second, and makes tap0 anew when it does (it
// clears the device's persist flag, so its old tap0 went when it let go):
// Restart gives the new tap0 the guest's address again, as the guest's
// network setup would, and returns once it has. The guest's connections
// stay open throughout: nothing tells its kernel that gvproxy restarted.
func (p *tapPath) Restart() {
	p.t.Helper()
	before := p.tapIndex()
	p.Stop()
	p.Start()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if i := p.tapIndex(); i != 0 && i != before {
			break
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(p.log)
			p.t.Fatalf("gvforwarder did not make tap0 again after gvproxy restarted:\n%s", out)
		}
		time.Sleep(5 * time.Millisecond)
	}
	p.configureTap()
}

// Stop kills gvproxy; its forwards go with it.
func (g *gvproxyProc) Stop() {
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Kill()
	_ = g.cmd.Wait()
	g.cmd = nil
}

// Dial makes a connection from inside the guest's namespace.
func (p *tapPath) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialIn(ctx, "/var/run/netns/"+p.ns, network, addr)
}

// waitGuest waits until the guest reaches the API through the tap device.
func (p *tapPath) waitGuest() {
	p.t.Helper()
	client := &http.Client{Transport: &http.Transport{DialContext: p.Dial}, Timeout: time.Second}
	defer client.CloseIdleConnections()
	var last error
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		res, err := client.Get(p.URL() + "/services/forwarder/all")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("HTTP %d", res.StatusCode)
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	out, _ := os.ReadFile(p.log)
	p.t.Fatalf("the guest does not reach %s through the tap device: %v\ngvforwarder:\n%s", p.URL(), last, out)
}

// local lists gvproxy's forwards, through its API on loopback, as "proto
// local".
func (g *gvproxyProc) local(t testing.TB) []string {
	t.Helper()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: g.LoopbackURL(), GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all, err := s.Forwards(context.Background())
	if err != nil {
		t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	var out []string
	for _, f := range all {
		out = append(out, f.Protocol+" "+f.Local)
	}
	slices.Sort(out)
	return out
}

// dialIn dials addr from inside the network namespace at path, on a thread
// that enters it and is never handed back to the runtime (the thread ends
// with the goroutine); the connection stays in that namespace once made.
func dialIn(ctx context.Context, path, network, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(path)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: fmt.Errorf("entering %s: %w", path, err)}
			return
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		done <- result{conn, err}
	}()
	r := <-done
	return r.conn, r.err
}

// TestRestartOnTheTapPath restarts gvproxy behind the gateway address the
// guest reaches through gvforwarder: the guest's connections stay open
// (nothing tells the guest's kernel), and the new network stack knows
// nothing of them. With the periodic full check off, the probe notices, a
// reconcile runs and the forwards come back.
func TestRestartOnTheTapPath(t *testing.T) {
	p := startTapPath(t)
	r, logs := startProbedRouter(t, p.URL(), core.RouterConfig{SyncGrace: 100 * time.Millisecond}, p.Dial)
	ports := []int{testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)}
	r.Emitter("docker").Set(loopbackPorts("a", ports...))
	want := tcpLocal(ports...)
	wait := func(what string) {
		t.Helper()
		testenv.Eventually(t, 30*time.Second, what, func() (bool, string) {
			got := p.local(t)
			return slices.Equal(got, want), fmt.Sprintf("have %q, want %q", got, want)
		})
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, e := range logs.All() {
				t.Log(e.Time.Format("05.000"), e.Message, e.ContextMap())
			}
			out, _ := os.ReadFile(p.log)
			t.Logf("gvforwarder:\n%s", out)
		}
	})
	wait("the forwards")
	for round := range 2 {
		syncs, noticed := sinkStatus(t, r).Syncs, probeNoticed(logs)
		p.Restart()
		wait(fmt.Sprintf("the forwards after restart %d", round))
		if got := probeNoticed(logs); got <= noticed {
			t.Errorf("restart %d: the probe logged nothing about it (log: %v)", round, messages(logs))
		}
		if got := sinkStatus(t, r).Syncs; got <= syncs {
			t.Errorf("restart %d: %d reconciles before, %d after; want one more", round, syncs, got)
		}
	}
	t.Logf("sink log: %v", messages(logs))
}
