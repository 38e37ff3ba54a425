// Package gvproxytest runs the real gvisor-tap-vsock gvproxy for tests,
// with its forwarder API on a loopback port. Exposed forwards listen on this
// machine's loopback.
package gvproxytest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/testenv"
)

// Gvproxy is a running gvproxy.
type Gvproxy struct {
	t        testing.TB
	bin, dir string
	apiPort  int
	sshPort  int
	cmd      *exec.Cmd
}

// Start runs gvproxy (from GUESTAGENT_GVPROXY or PATH) until the test ends.
func Start(t testing.TB) *Gvproxy {
	t.Helper()
	g := &Gvproxy{
		t:       t,
		bin:     testenv.Binary(t, "GUESTAGENT_GVPROXY", "gvproxy"),
		dir:     t.TempDir(),
		apiPort: testenv.FreePort(t),
		sshPort: testenv.FreePort(t),
	}
	g.Start()
	t.Cleanup(g.Stop)
	return g
}

// URL is the base URL of the forwarder API.
func (g *Gvproxy) URL() string { return fmt.Sprintf("http://127.0.0.1:%d", g.apiPort) }

// Start starts gvproxy again after Stop, on the same ports, with no forwards.
func (g *Gvproxy) Start() {
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

// Stop kills gvproxy; its forwards go with it.
func (g *Gvproxy) Stop() {
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Kill()
	_ = g.cmd.Wait()
	g.cmd = nil
}
