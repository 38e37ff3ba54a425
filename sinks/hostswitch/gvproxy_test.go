package hostswitch_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// gvproxy runs the real gvisor-tap-vsock gvproxy with its forwarder API on
// a loopback port. Exposed forwards listen on this machine's loopback.
type gvproxy struct {
	t        *testing.T
	bin, dir string
	apiPort  int
	sshPort  int
	cmd      *exec.Cmd
}

func startGvproxy(t *testing.T) *gvproxy {
	g := &gvproxy{
		t:       t,
		bin:     testenv.Binary(t, "GUESTAGENT_GVPROXY", "gvproxy"),
		dir:     t.TempDir(),
		apiPort: testenv.FreePort(t),
		sshPort: testenv.FreePort(t),
	}
	g.start()
	t.Cleanup(g.stop)
	return g
}

func (g *gvproxy) url() string { return fmt.Sprintf("http://127.0.0.1:%d", g.apiPort) }

func (g *gvproxy) start() {
	g.t.Helper()
	sock := filepath.Join(g.dir, "gv.sock")
	_ = os.Remove(sock)
	log, err := os.OpenFile(filepath.Join(g.dir, "gvproxy.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		g.t.Fatal(err)
	}
	defer log.Close()
	g.cmd = exec.Command(g.bin,
		"-listen", "unix://"+sock,
		"-services", fmt.Sprintf("tcp://127.0.0.1:%d", g.apiPort),
		"-ssh-port", fmt.Sprint(g.sshPort),
		"-pid-file", filepath.Join(g.dir, "pid"))
	g.cmd.Stdout, g.cmd.Stderr = log, log
	if err := g.cmd.Start(); err != nil {
		g.t.Fatalf("starting gvproxy: %v", err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", g.apiPort), time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(filepath.Join(g.dir, "gvproxy.log"))
			g.t.Fatalf("gvproxy API did not come up: %v\n%s", err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (g *gvproxy) stop() {
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Kill()
	_ = g.cmd.Wait()
	g.cmd = nil
}

func newSink(t *testing.T, url string, check time.Duration) *hostswitch.Sink {
	t.Helper()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: url, GuestIP: hostswitch.DefaultGuestIP, CheckInterval: check})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// state lists the forwards the agent made, as "proto local".
func (g *gvproxy) state(t *testing.T) []string {
	s := newSink(t, g.url(), 0)
	all, err := s.List(context.Background())
	if err != nil {
		t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	var out []string
	for _, f := range all {
		if strings.HasPrefix(f.Remote, hostswitch.DefaultGuestIP+":") && !strings.HasSuffix(f.Remote, ":22") {
			out = append(out, f.Protocol+" "+f.Local)
		}
	}
	return out
}

func TestContractAgainstGvproxy(t *testing.T) {
	g := startGvproxy(t)
	sinktest.Run(t, sinktest.Harness{
		New:   func(t *testing.T) core.Sink { return newSink(t, g.url(), 100*time.Millisecond) },
		State: g.state,
		Restart: func(t *testing.T) {
			g.stop()
			g.start()
		},
		Outage: func(t *testing.T, during func()) {
			g.stop()
			during()
			time.Sleep(300 * time.Millisecond) // let deliveries fail
			g.start()
		},
	})
}

// TestExposedPortForwards checks that gvproxy really listens on the local
// address the sink asked for, and stops when it is removed.
func TestExposedPortListens(t *testing.T) {
	g := startGvproxy(t)
	s := newSink(t, g.url(), 0)
	port := uint16(testenv.FreePort(t))
	m := sinktest.Mapping("docker", "c1", port, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("exposed port %s does not accept connections: %v", addr, err)
	}
	c.Close()
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections after unexpose", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSyncRemovesLeftoversOnly starts from forwards a previous agent left
// behind and checks that Sync removes those but keeps gvproxy's own SSH
// forward and the desired ports.
func TestSyncRemovesLeftoversOnly(t *testing.T) {
	g := startGvproxy(t)
	s := newSink(t, g.url(), 0)
	ctx := context.Background()
	leftover := sinktest.Mapping("docker", "old", 41501, 2)
	keep := sinktest.Mapping("docker", "keep", 41511, 1)
	for _, m := range []core.Mapping{leftover, keep} {
		if err := s.Send(ctx, core.Change{Mapping: m}); err != nil {
			t.Fatal(err)
		}
	}
	fresh := newSink(t, g.url(), 0) // as after an agent restart
	want := sinktest.Mapping("docker", "new", 41521, 1)
	if err := fresh.Sync(ctx, []core.Mapping{keep, want}); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(g.state(t), ",")
	if got != "tcp 127.0.0.1:41511,tcp 127.0.0.1:41521" {
		t.Errorf("after Sync: %s", got)
	}
	all, err := fresh.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ssh bool
	for _, f := range all {
		ssh = ssh || f.Remote == hostswitch.DefaultGuestIP+":22"
	}
	if !ssh {
		t.Error("Sync removed gvproxy's own SSH forward")
	}
}
