// Package gvproxytest runs the real gvisor-tap-vsock gvproxy for tests,
// with its forwarder API on a loopback port. Exposed forwards listen on this
// machine's loopback. A guest joins its virtual network (192.168.127.0/24)
// through the unix socket at Socket: StartGuest runs gvforwarder on a tap
// device in a network namespace of the test's own, the real
// network-tunnel path with no VM. Like host-switch, it can start with
// static forwards of its own (from its configuration file), which it lists
// in /all and brings back after every restart.
package gvproxytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// Gvproxy is a running gvproxy.
type Gvproxy struct {
	t        testing.TB
	bin, dir string
	apiPort  int
	sshPort  int
	static   map[string]string
	cmd      *exec.Cmd
	upAt     time.Time // when the API first accepted a connection after the last Start
}

// Start runs gvproxy (from GUESTAGENT_GVPROXY or PATH) until the test ends,
// with its SSH forward (127.0.0.1:SSHPort() -> 192.168.127.2:22) and the
// static forwards given as local -> remote ("127.0.0.1:6443" ->
// "192.168.127.2:6443", say).
func Start(t testing.TB, static ...map[string]string) *Gvproxy {
	t.Helper()
	g := &Gvproxy{
		t:       t,
		bin:     testenv.Binary(t, "GUESTAGENT_GVPROXY", "gvproxy"),
		dir:     t.TempDir(),
		apiPort: testenv.FreePort(t),
		sshPort: testenv.FreePort(t),
		static:  map[string]string{},
	}
	for _, m := range static {
		maps.Copy(g.static, m)
	}
	g.static[fmt.Sprintf("127.0.0.1:%d", g.sshPort)] = GuestIP + ":22"
	g.Start()
	t.Cleanup(g.Stop)
	return g
}

// SSHPort is the local port of gvproxy's SSH forward.
func (g *Gvproxy) SSHPort() int { return g.sshPort }

// Static returns gvproxy's own forwards, local -> remote, its SSH forward
// included.
func (g *Gvproxy) Static() map[string]string { return maps.Clone(g.static) }

// config is gvproxy's configuration file: the stack of the default
// virtual network (192.168.127.0/24) with the static forwards.
func (g *Gvproxy) config(sock string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "listen:\n  - unix://%s\nservices: tcp://127.0.0.1:%d\npid-file: %s\n", sock, g.apiPort, filepath.Join(g.dir, "pid"))
	fmt.Fprintf(&b, "stack:\n  mtu: 1500\n  subnet: 192.168.127.0/24\n  gatewayIP: %s\n  gatewayMacAddress: 5a:94:ef:e4:0c:dd\n", GatewayIP)
	fmt.Fprintf(&b, "  dhcpStaticLeases:\n    %s: %s\n  forwards:\n", GuestIP, GuestMAC)
	for _, local := range slices.Sorted(maps.Keys(g.static)) {
		fmt.Fprintf(&b, "    %q: %q\n", local, g.static[local])
	}
	return b.String()
}

// URL is the base URL of the forwarder API.
func (g *Gvproxy) URL() string { return fmt.Sprintf("http://127.0.0.1:%d", g.apiPort) }

// Socket is the path of gvproxy's -listen unix socket: a guest's network
// connection (POST /connect, then its Ethernet frames) and the API too.
// The path stays the same across Stop and Start.
func (g *Gvproxy) Socket() string { return filepath.Join(g.dir, "gv.sock") }

// Start starts gvproxy again after Stop, on the same ports, with only its
// static forwards, and returns once its API accepts connections (UpAt
// says when it first did).
func (g *Gvproxy) Start() {
	g.t.Helper()
	sock := g.Socket()
	_ = os.Remove(sock)
	log, err := os.OpenFile(filepath.Join(g.dir, "gvproxy.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		g.t.Fatal(err)
	}
	defer log.Close()
	conf := filepath.Join(g.dir, "gvproxy.yaml")
	if err := os.WriteFile(conf, []byte(g.config(sock)), 0o644); err != nil {
		g.t.Fatal(err)
	}
	g.cmd = exec.Command(g.bin, "-config", conf)
	g.cmd.Stdout, g.cmd.Stderr = log, log
	if err := g.cmd.Start(); err != nil {
		g.t.Fatalf("starting gvproxy: %v", err)
	}
	// Asked every millisecond, so that UpAt is the moment it came up,
	// which restart benchmarks time from; a refused connection costs
	// next to nothing.
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", g.apiPort), time.Second)
		if err == nil {
			g.upAt = time.Now()
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(filepath.Join(g.dir, "gvproxy.log"))
			g.t.Fatalf("gvproxy API did not come up: %v\n%s", err, out)
		}
		time.Sleep(time.Millisecond)
	}
}

// UpAt is when the API of the running gvproxy first accepted a
// connection.
func (g *Gvproxy) UpAt() time.Time { return g.upAt }

// Pid is the running gvproxy's process id.
func (g *Gvproxy) Pid() int { return g.cmd.Process.Pid }

// Stop kills gvproxy; its forwards go with it.
func (g *Gvproxy) Stop() {
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Kill()
	_ = g.cmd.Wait()
	g.cmd = nil
}

// Expose adds a forward through the API, as another party (a user, say)
// would: one that is not gvproxy's own, so that a restart loses it.
func (g *Gvproxy) Expose(protocol, local, remote string) error {
	return g.post("expose", map[string]string{"local": local, "remote": remote, "protocol": protocol})
}

// Unexpose removes a forward through the API, as another party would.
func (g *Gvproxy) Unexpose(protocol, local string) error {
	return g.post("unexpose", map[string]string{"local": local, "protocol": protocol})
}

func (g *Gvproxy) post(op string, f map[string]string) error {
	body, err := json.Marshal(f)
	if err != nil {
		return err
	}
	res, err := http.Post(g.URL()+"/services/forwarder/"+op, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer res.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s %s -> %s: HTTP %d: %s", op, f["protocol"], f["local"], f["remote"], res.StatusCode, bytes.TrimSpace(answer))
	}
	return nil
}
