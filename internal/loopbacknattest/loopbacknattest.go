// Package loopbacknattest builds the network paths that loopback NAT tests
// send real traffic over: veth links between network namespaces the test
// created, CNI bridge networks with portmap rules made by the real CNI
// plugins, and HTTP requests made from inside a namespace.
package loopbacknattest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/internal/testenv"
)

// End is one end of a veth link: the namespace (a name under
// /var/run/netns), the interface name and its address with prefix length.
type End struct {
	Netns, Iface, Addr string
}

// Link connects a and b with a veth pair, addresses both ends and brings
// them up. The pair goes when a's end is deleted at the end of the test,
// or with either namespace.
func Link(t testing.TB, a, b End) {
	t.Helper()
	testenv.RunIn(t, a.Netns, "ip", "link", "add", a.Iface, "type", "veth", "peer", "name", b.Iface, "netns", b.Netns)
	t.Cleanup(func() {
		argv := testenv.InNetns(a.Netns, "ip", "link", "delete", a.Iface)
		_ = runQuiet(argv)
	})
	for _, e := range []End{a, b} {
		testenv.RunIn(t, e.Netns, "ip", "addr", "add", e.Addr, "dev", e.Iface)
		testenv.RunIn(t, e.Netns, "ip", "link", "set", e.Iface, "up")
	}
}

// NetnsPath is the path of the namespace called name.
func NetnsPath(name string) string { return "/var/run/netns/" + name }

// Get sends an HTTP GET to addr (ip:port) from inside the network
// namespace at path and returns the body of the answer, trimmed. A refused
// connection gives an error that matches syscall.ECONNREFUSED.
func Get(path, addr string) (string, error) {
	conn, err := DialFrom(path, addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: test\r\n\r\n"); err != nil {
		return "", fmt.Errorf("request to %s: %w", addr, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", fmt.Errorf("answer from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("answer from %s: %w", addr, err)
	}
	return strings.TrimSpace(string(body)), nil
}

// DialFrom opens a TCP connection to addr from inside the network
// namespace at path, as DialNetworkFrom with "tcp4".
func DialFrom(path, addr string) (net.Conn, error) { return DialNetworkFrom(path, "tcp4", addr) }

// DialNetworkFrom connects to addr over network ("tcp4", "udp6", ...) from
// inside the network namespace at path. The socket is made on a thread
// that enters the namespace and is never handed back to the runtime, so no
// other goroutine runs there; the connection stays in that namespace once
// made.
func DialNetworkFrom(path, network, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread ends with the goroutine
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
		conn, err := net.DialTimeout(network, addr, 10*time.Second)
		done <- result{conn, err}
	}()
	r := <-done
	return r.conn, r.err
}

// Refused fails t unless a connection to addr from the namespace at path
// is refused (answered with a reset, as a port nobody listens on is).
func Refused(t testing.TB, what, path, addr string) {
	t.Helper()
	body, err := Get(path, addr)
	switch {
	case err == nil:
		t.Errorf("%s: %s answered %q; want the connection refused", what, addr, body)
	case !isRefused(err):
		t.Errorf("%s: %s: %v; want the connection refused", what, addr, err)
	}
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

func runQuiet(argv []string) error { return exec.Command(argv[0], argv[1:]...).Run() }

// CNIDir is where Debian's containernetworking-plugins puts the plugins.
const CNIDir = "/usr/lib/cni"

// PortMapping is one entry of the portmap plugin's runtimeConfig.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// CNI is a bridge network made by the real bridge and portmap plugins, as
// nerdctl makes one: the bridge, its gateway and the portmap chains live in
// the namespace Netns (the guest).
type CNI struct {
	// Netns is the namespace (a name) the plugins run in.
	Netns string
	// Name is the network's name (nerdctl's default is "bridge"); the
	// portmap chains are named after it and the container id.
	Name string
	// Bridge is the bridge interface and Subnet the network's IPv4 subnet.
	Bridge, Subnet string
	// DataDir keeps host-local's address leases.
	DataDir string
}

// Add attaches the namespace at path to the network as container id
// (interface eth0), with portmap rules for ports, and returns the
// container's address.
func (c CNI) Add(t testing.TB, id, path string, ports []PortMapping) netip.Addr {
	t.Helper()
	for _, p := range []string{"bridge", "host-local", "portmap"} {
		if _, err := os.Stat(filepath.Join(CNIDir, p)); err != nil {
			testenv.Missing(t, "the CNI "+p+" plugin ("+err.Error()+")")
		}
	}
	bridge := map[string]any{
		"cniVersion": "1.0.0", "name": c.Name, "type": "bridge", "bridge": c.Bridge, "isGateway": true,
		"ipam": map[string]any{
			"type": "host-local", "dataDir": c.DataDir,
			"ranges": [][]map[string]string{{{"subnet": c.Subnet}}},
			"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
		},
	}
	out := c.plugin(t, "bridge", id, path, bridge)
	var res struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.IPs) == 0 {
		t.Fatalf("bridge plugin result %s: %v", out, err)
	}
	prefix, err := netip.ParsePrefix(res.IPs[0].Address)
	if err != nil {
		t.Fatalf("bridge plugin result %s: %v", out, err)
	}
	if len(ports) > 0 {
		portmap := map[string]any{
			"cniVersion": "1.0.0", "name": c.Name, "type": "portmap",
			"capabilities":  map[string]bool{"portMappings": true},
			"runtimeConfig": map[string]any{"portMappings": ports},
			"prevResult":    json.RawMessage(out),
		}
		c.plugin(t, "portmap", id, path, portmap)
	}
	return prefix.Addr()
}

// plugin runs a CNI plugin's ADD in c.Netns and returns its result.
func (c CNI) plugin(t testing.TB, name, id, path string, conf any) []byte {
	t.Helper()
	stdin, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	argv := testenv.InNetns(c.Netns, filepath.Join(CNIDir, name))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD", "CNI_CONTAINERID="+id, "CNI_NETNS="+path,
		"CNI_IFNAME=eth0", "CNI_PATH="+CNIDir)
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("CNI %s ADD for %s: %v: %s%s", name, id, err, out, stderr.Bytes())
	}
	return out
}
