package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
)

// listForwards returns the forwards gvproxy's API at url lists.
func listForwards(url string) ([]hostswitch.Forward, error) {
	s, err := hostswitch.New(hostswitch.Config{BaseURL: url, GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.Forwards(ctx)
}

// ourForwards lists gvproxy's forwards that the agent owns (to the guest
// address, on the port they listen on), as "proto local".
func ourForwards(t testing.TB, url string) []string {
	t.Helper()
	all, err := listForwards(url)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, f := range all {
		_, port, _ := net.SplitHostPort(f.Local)
		if f.Remote == net.JoinHostPort(hostswitch.DefaultGuestIP, port) {
			out = append(out, f.Protocol+" "+f.Local)
		}
	}
	slices.Sort(out)
	return out
}

// waitFor waits up to 15 s for cond.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, what, func() (bool, string) { return cond(), "not yet" })
}

// TestNetworkingModes runs the whole agent in each networking mode against
// the real gvproxy as host-switch, the wsl-proxy test peer and a vtunnel
// peer, and checks where each mapping lands and that shutdown removes it.
func TestNetworkingModes(t *testing.T) {
	p1, p2 := testenv.FreePort(t), testenv.FreePort(t)
	static := fmt.Sprintf(`{"mappings":[{"id":"web","ports":[
		{"protocol":"tcp","containerPort":80,"hostIP":"%s","hostPort":%d},
		{"protocol":"udp","containerPort":53,"hostIP":"127.0.0.1","hostPort":%d},
		{"protocol":"tcp","containerPort":443,"hostIP":"127.0.0.1","hostPort":443}]}]}`, "%s", p1, p2)

	tests := []struct {
		name     string
		bindIP   string // binding the static file asks for
		args     []string
		forwards []string // on gvproxy while running
		wsl      []string // on the wsl-proxy peer
		vtunnel  bool
	}{
		{
			name: "network tunnel", bindIP: "127.0.0.1", args: []string{"--adminInstall", "--sockets=false"},
			forwards: []string{fmt.Sprintf("tcp 127.0.0.1:%d", p1), fmt.Sprintf("udp 127.0.0.1:%d", p2), "tcp 127.0.0.1:443"},
			wsl:      []string{fmt.Sprintf("tcp 127.0.0.1:%d", p1), fmt.Sprintf("udp 127.0.0.1:%d", p2), "tcp 127.0.0.1:443"},
		},
		{
			name: "non-admin", bindIP: "0.0.0.0",
			forwards: []string{fmt.Sprintf("tcp 127.0.0.1:%d", p1), fmt.Sprintf("udp 127.0.0.1:%d", p2)},
			wsl:      []string{fmt.Sprintf("tcp 127.0.0.1:%d", p1), fmt.Sprintf("udp 127.0.0.1:%d", p2)},
		},
		{
			name: "non-admin without WSL integration", bindIP: "0.0.0.0", args: []string{"--wslIntegration=false"},
			forwards: []string{fmt.Sprintf("tcp 127.0.0.1:%d", p1), fmt.Sprintf("udp 127.0.0.1:%d", p2)},
		},
		{
			name: "privileged service", bindIP: "127.0.0.1", args: []string{"--privilegedService"},
			vtunnel: true,
		},
	}
	for _, tt := range tests {
		slices.Sort(tt.forwards)
		slices.Sort(tt.wsl)
		t.Run(tt.name, func(t *testing.T) {
			gv := gvproxytest.Start(t)
			wsl := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true}
			if err := wsl.Start(); err != nil {
				t.Fatal(err)
			}
			defer wsl.Stop()
			vt, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer vt.Close()
			vtMsgs := make(chan string, 16)
			go func() {
				for {
					c, err := vt.Accept()
					if err != nil {
						return
					}
					buf := make([]byte, 4096)
					n, _ := c.Read(buf)
					c.Close()
					if n > 0 {
						vtMsgs <- string(buf[:n])
					}
				}
			}()
			file := filepath.Join(t.TempDir(), "static.json")
			if err := os.WriteFile(file, []byte(fmt.Sprintf(static, tt.bindIP)), 0o644); err != nil {
				t.Fatal(err)
			}
			args := append([]string{
				"--sources=static", "--staticFile=" + file,
				"--hostSwitchURL=" + gv.URL(), "--wslProxySocket=" + wsl.Path,
				"--vtunnelAddr=" + vt.Addr().String(), "--vtunnelInterface=",
			}, tt.args...)
			var out, errOut syncBuffer
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan int, 1)
			go func() { done <- run(ctx, isolated(t, args), &out, &errOut) }()

			if tt.forwards != nil {
				waitFor(t, fmt.Sprintf("forwards %v", tt.forwards), func() bool { return slices.Equal(ourForwards(t, gv.URL()), tt.forwards) })
			}
			if tt.wsl != nil {
				waitFor(t, fmt.Sprintf("wsl-proxy state %v", tt.wsl), func() bool { return slices.Equal(wsl.State(), tt.wsl) })
			}
			if tt.vtunnel {
				// One message per port; wait for the one of p1.
				timeout := time.After(15 * time.Second)
				for found := false; !found; {
					select {
					case msg := <-vtMsgs:
						if strings.Contains(msg, `"remove":true`) {
							t.Errorf("vtunnel peer got a removal while the port is wanted: %s", msg)
						}
						found = strings.Contains(msg, fmt.Sprintf(`"HostPort":"%d"`, p1))
					case <-timeout:
						t.Fatalf("vtunnel peer got no message for port %d", p1)
					}
				}
				if got := ourForwards(t, gv.URL()); len(got) != 0 {
					t.Errorf("privileged-service mode must not use host-switch; it has %v", got)
				}
			}
			cancel()
			if code := <-done; code != 0 {
				t.Fatalf("exit %d: %s", code, errOut.String())
			}
			if got := ourForwards(t, gv.URL()); len(got) != 0 {
				t.Errorf("after shutdown gvproxy still forwards %v", got)
			}
			if got := wsl.State(); len(got) != 0 {
				t.Errorf("after shutdown wsl-proxy still listens on %v", got)
			}
			if tt.wsl == nil && len(wsl.Received()) != 0 {
				t.Errorf("wsl-proxy got messages with WSL integration off: %v", wsl.Received())
			}
			if err := wsl.Err(); err != nil {
				t.Errorf("wsl-proxy peer: %v", err)
			}
			if n := wsl.Truncated(); n > 0 {
				t.Errorf("wsl-proxy got %d messages cut short", n)
			}
		})
	}
}

// TestK8sAPIMappingGoesToWSLProxyOnly runs the agent with --kubernetes (no
// cluster yet) in network-tunnel mode: wsl-proxy gets 127.0.0.1:<k8sAPIPort>,
// host-switch does not.
func TestK8sAPIMappingGoesToWSLProxyOnly(t *testing.T) {
	gv := gvproxytest.Start(t)
	wsl := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true}
	if err := wsl.Start(); err != nil {
		t.Fatal(err)
	}
	defer wsl.Stop()
	args := []string{"--adminInstall", "--sockets=false", "--kubernetes", "--iptables=false", "--k8sAPIPort=16443",
		"--kubeconfig=" + filepath.Join(t.TempDir(), "absent.yaml"),
		"--hostSwitchURL=" + gv.URL(), "--wslProxySocket=" + wsl.Path}
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() { done <- run(ctx, isolated(t, args), &out, &errOut) }()
	waitFor(t, "the API port on wsl-proxy", func() bool { return slices.Equal(wsl.State(), []string{"tcp 127.0.0.1:16443"}) })
	time.Sleep(200 * time.Millisecond)
	if got := ourForwards(t, gv.URL()); len(got) != 0 {
		t.Errorf("host-switch got %v", got)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(errOut.String(), "waiting for the kubeconfig") {
		t.Errorf("no log line about the missing kubeconfig:\n%s", errOut.String())
	}
}
