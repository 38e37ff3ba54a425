package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sinks/wslproxy"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
)

// TestWSLProxyUpstreamReachesEveryPort runs the desktop app's WSL
// topology: the agent in its own network namespace (dockerd's, the guest),
// WSL's default namespace beside it, joined by the veth pair the app
// makes (veth-rd-ns with 192.168.143.1 in the guest, veth-rd-wsl with
// 192.168.143.2 in the default namespace), and a wsl-proxy peer as strict
// as the real one in the default namespace, listening on each port it is
// sent and forwarding it to 192.168.143.1:PORT. The agent runs as the app
// runs it (--adminInstall --docker, defaults otherwise: the sockets source,
// host-switch through a real gvproxy, wsl-proxy). From the default
// namespace, through wsl-proxy's listeners, a Docker port published on
// 0.0.0.0 and one on 127.0.0.1, and host-network listeners on 0.0.0.0 and
// on 127.0.0.1 all answer; from a container on the bridge, the 127.0.0.1
// ones are refused at the upstream address (through NAT and through the
// relay).
func TestWSLProxyUpstreamReachesEveryPort(t *testing.T) {
	testenv.Integration(t)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "docker"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := dockerdtest.Start(filepath.Join(dir, "docker"))
	if err != nil {
		testenv.Missing(t, "dockerd ("+err.Error()+")")
	}
	defer d.Close()
	gv := gvproxytest.Start(t)
	api := forwardInNetns(t, d.Netns, gv.Socket())

	const upstream = wslproxy.DefaultUpstreamAddr // 192.168.143.1
	wslNS := testenv.Netns(t)
	loopbacknattest.Link(t,
		loopbacknattest.End{Netns: d.Netns, Iface: wslproxy.DefaultUpstreamInterface, Addr: upstream + "/24"},
		loopbacknattest.End{Netns: wslNS, Iface: "veth-rd-wsl", Addr: "192.168.143.2/24"})
	peer := &wslproxytest.Peer{
		Path:     filepath.Join(dir, "wsl-proxy.sock"),
		Netns:    wslNS,
		Upstream: func(p uint16) string { return fmt.Sprintf("%s:%d", upstream, p) },
	}
	if err := peer.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		peer.Stop()
		if err := peer.Err(); err != nil {
			t.Errorf("wsl-proxy peer: %v", err)
		}
	}()

	// Host-network listeners in the guest, on 0.0.0.0 and on 127.0.0.1.
	hostAny, hostLoop := testenv.FreePort(t), testenv.FreePort(t)
	for _, c := range []struct {
		addr, answer string
	}{{fmt.Sprintf("0.0.0.0:%d", hostAny), "host-any"}, {fmt.Sprintf("127.0.0.1:%d", hostLoop), "host-loopback"}} {
		ln := listenInNetns(t, d.Netns, c.addr)
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			fmt.Fprintln(w, c.answer)
		}), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}

	startAgentInNetns(t, d.Netns, "--adminInstall", "--docker", "--dockerHost="+d.Host,
		"--hostSwitchURL=http://"+api, "--wslProxySocket="+peer.Path)

	dockerAny, dockerLoop := testenv.FreePort(t), testenv.FreePort(t)
	run := func(args ...string) string {
		t.Helper()
		id, err := d.Docker(append(append([]string{"run", "-d"}, args...), dockerdtest.WebImage)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = d.Docker("rm", "-f", id) })
		return strings.TrimSpace(id)
	}
	anyID := run("-p", fmt.Sprintf("0.0.0.0:%d:80", dockerAny))
	loopID := run("-p", fmt.Sprintf("127.0.0.1:%d:80", dockerLoop))
	client := run()
	pid, err := d.Docker("inspect", "--format", "{{.State.Pid}}", client)
	if err != nil {
		t.Fatal(err)
	}
	containerNS := "/proc/" + strings.TrimSpace(pid) + "/ns/net"

	wslPath := loopbacknattest.NetnsPath(wslNS)
	for _, c := range []struct {
		what, addr, want string
	}{
		{"a Docker port on 0.0.0.0", fmt.Sprintf("127.0.0.1:%d", dockerAny), anyID[:12]},
		{"a Docker port on 127.0.0.1", fmt.Sprintf("127.0.0.1:%d", dockerLoop), loopID[:12]},
		{"a host-network listener on 0.0.0.0", fmt.Sprintf("127.0.0.1:%d", hostAny), "host-any"},
		{"a host-network listener on 127.0.0.1", fmt.Sprintf("127.0.0.1:%d", hostLoop), "host-loopback"},
	} {
		var body string
		testenv.Eventually(t, 30*time.Second, c.what+" answering in WSL's default namespace at "+c.addr, func() (bool, string) {
			var err error
			body, err = loopbacknattest.Get(wslPath, c.addr)
			if err != nil {
				return false, fmt.Sprintf("%v (wsl-proxy listens on %q)", err, peer.State())
			}
			return true, ""
		})
		if body != c.want {
			t.Errorf("%s: %s answered %q, want %q", c.what, c.addr, body, c.want)
		}
	}
	for _, c := range []struct{ what, addr string }{
		{"a container to the upstream address, the Docker port on 127.0.0.1", net.JoinHostPort(upstream, fmt.Sprint(dockerLoop))},
		{"a container to the upstream address, the host-network listener on 127.0.0.1", net.JoinHostPort(upstream, fmt.Sprint(hostLoop))},
	} {
		loopbacknattest.Refused(t, c.what, containerNS, c.addr)
	}
}
