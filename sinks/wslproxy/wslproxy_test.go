package wslproxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/sinks/wslproxy"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
)

func startPeer(t *testing.T, upstream func(uint16) string) *wslproxytest.Peer {
	t.Helper()
	p := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), Upstream: upstream}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop()
		if err := p.Err(); err != nil {
			t.Errorf("peer errors: %v", err)
		}
	})
	return p
}

func TestContract(t *testing.T) {
	p := startPeer(t, nil)
	sinktest.Run(t, sinktest.Harness{
		New:   func(*testing.T) core.Sink { return wslproxy.New(p.Path, 50*time.Millisecond, nil) },
		State: func(*testing.T) []string { return p.State() },
		Restart: func(t *testing.T) {
			p.Stop()
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
		},
		Outage: func(t *testing.T, during func()) {
			p.Stop()
			during()
			time.Sleep(200 * time.Millisecond)
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
		},
	})
}

func TestExactPayload(t *testing.T) {
	p := startPeer(t, nil)
	s := wslproxy.New(p.Path, 0, nil)
	m := sinktest.Mapping("docker", "c1", 11201, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(p.Received()) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	got := p.Received()
	if len(got) != 2 {
		t.Fatalf("peer received %d messages, want 2", len(got))
	}
	want := []string{
		`{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"11201"}]},"connectAddrs":[{"network":"tcp","addr":"198.18.0.2:80"}]}`,
		`{"remove":true,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"11201"}]},"connectAddrs":[{"network":"tcp","addr":"198.18.0.2:80"}]}`,
	}
	for i, pm := range got {
		b, _ := json.Marshal(pm)
		if string(b) != want[i] {
			t.Errorf("message %d:\n got %s\nwant %s", i, b, want[i])
		}
	}
}

// TestTrafficReachesUpstream sends a connection through the listener the
// peer opened for the mapping, as a user in another distribution would.
func TestTrafficReachesUpstream(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	p := startPeer(t, func(uint16) string { return echo.Addr().String() })
	s := wslproxy.New(p.Path, 0, nil)
	m := sinktest.Mapping("docker", "web", 11211, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	deadline := time.Now().Add(5 * time.Second)
	for c == nil {
		c, err = net.Dial("tcp", "127.0.0.1:11211")
		if err != nil && time.Now().After(deadline) {
			t.Fatalf("peer never listened: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through the forwarded port: %q, %v", buf, err)
	}
}

func TestMissingSocketIsPeerDown(t *testing.T) {
	s := wslproxy.New(filepath.Join(t.TempDir(), "absent.sock"), 0, nil)
	err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 11221, 1)})
	if !errors.Is(err, core.ErrPeerDown) || !strings.Contains(err.Error(), "absent.sock") {
		t.Errorf("err = %v, want ErrPeerDown naming the socket", err)
	}
}

// TestPeerThatHangsUpOrStalls: a socket that closes at once, or never reads,
// must not block Send beyond its context.
func TestPeerThatStalls(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stall.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // never read
		}
	}()
	big := sinktest.Mapping("d", "a", 1024, 20000) // a large message fills the socket buffer
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- wslproxy.New(path, 0, nil).Send(ctx, core.Change{Mapping: big}) }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("a peer that never reads accepted a message larger than the socket buffer")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Send blocked past its deadline")
	}
}

// TestSctpIsNotSent runs a router with the sink in front of the strict
// peer: of a mapping with a tcp and an sctp port, wsl-proxy gets the tcp
// one alone (it handles tcp and udp, and never answers, so an sctp port
// would fail unseen), and the status shows the sctp port as unsupported.
func TestSctpIsNotSent(t *testing.T) {
	p := startPeer(t, nil)
	r := core.NewRouter(core.RouterConfig{})
	r.AddSink(wslproxy.Name, wslproxy.New(p.Path, 0, nil), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	m := sinktest.Mapping("docker", "c1", 11211, 1)
	sctp := m.Ports[0]
	sctp.Protocol, sctp.HostPort = core.SCTP, 11212
	m.Ports = append(m.Ports, sctp)
	r.Emitter("docker").Set(m)
	var status string
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var states []string
		for _, ps := range r.Status().Ports {
			for _, at := range ps.Sinks {
				states = append(states, fmt.Sprintf("%s/%d %s", ps.Protocol, ps.HostPort, at.State))
			}
		}
		status = strings.Join(states, ", ")
		if status == "sctp/11212 unsupported, tcp/11211 exposed" {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if status != "sctp/11212 unsupported, tcp/11211 exposed" {
		t.Fatalf("status %q", status)
	}
	for _, pm := range p.Received() {
		for key := range pm.Ports {
			if strings.HasSuffix(key.String(), "/sctp") {
				t.Errorf("wsl-proxy was sent %s", key)
			}
		}
	}
}
