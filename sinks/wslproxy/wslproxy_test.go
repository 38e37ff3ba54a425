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

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/wslproxy"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
)

// startPeer runs a peer that listens on the ports it is sent and forwards
// them to upstream, until the test ends, and fails the test on any error
// the peer met.
func startPeer(t *testing.T, upstream func(uint16) string) *wslproxytest.Peer {
	t.Helper()
	return run(t, &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), Upstream: upstream})
}

func run(t *testing.T, p *wslproxytest.Peer) *wslproxytest.Peer {
	t.Helper()
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

func newSink(t *testing.T, cfg wslproxy.Config) *wslproxy.Sink {
	t.Helper()
	s, err := wslproxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestContract runs the contract suite. In an outage the peer comes back
// once the sink's check has logged its socket gone, so that the check
// sees both the loss and the new socket. The peer keeps its listeners'
// state without binding them: the suite's ports are fixed, and other
// packages' runs of it (sinks/hostswitch's, through gvproxy) bind them on
// 127.0.0.1 at the same time; TestTrafficReachesUpstream and
// TestSctpIsNotSent bind theirs.
func TestContract(t *testing.T) {
	p := run(t, &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true})
	obs, logs := observer.New(zap.WarnLevel)
	gone := func() int { return logs.FilterMessageSnippet("socket is gone").Len() }
	sinktest.Run(t, sinktest.Harness{
		New: func(t *testing.T) core.Sink {
			// An interval of an hour: the socket's changes are seen
			// through inotify alone.
			return newSink(t, wslproxy.Config{Socket: p.Path, CheckInterval: time.Hour, Log: zap.New(obs)})
		},
		State: func(*testing.T) []string { return p.State() },
		Restart: func(t *testing.T) {
			p.Stop()
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
		},
		Outage: func(t *testing.T, during func()) {
			before := gone()
			p.Stop()
			during()
			testenv.Eventually(t, 10*time.Second, "the check to find the socket gone", func() (bool, string) {
				return gone() > before, "no warning yet"
			})
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
		},
	})
}

// TestRestartIsSeenWithoutLooking restarts the peer twice while the sink
// watches with an interval of an hour: each new socket is reported at once
// (inotify), and nothing else is.
func TestRestartIsSeenWithoutLooking(t *testing.T) {
	p := run(t, &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true})
	s := newSink(t, wslproxy.Config{Socket: p.Path, CheckInterval: time.Hour})
	lost := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.WatchPeer(ctx, func() { lost <- struct{}{} }) }()
	defer func() { cancel(); <-done }()
	restart := func() {
		p.Stop()
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
	}
	// The watch begins at some point after WatchPeer is called: restart
	// until one is reported, then each must be, once.
	testenv.Eventually(t, 10*time.Second, "a restart reported", func() (bool, string) {
		restart()
		select {
		case <-lost:
			return true, ""
		case <-time.After(100 * time.Millisecond):
			return false, "not yet"
		}
	})
	for round := range 2 {
		restart()
		select {
		case <-lost:
		case <-time.After(10 * time.Second):
			t.Fatalf("restart %d: not reported", round)
		}
	}
	select {
	case <-lost:
		t.Error("reported more than the restarts")
	case <-time.After(200 * time.Millisecond):
	}
}

// TestConfigIsChecked: New refuses what the flags would refuse, naming
// the flag.
func TestConfigIsChecked(t *testing.T) {
	for _, tt := range []struct {
		cfg  wslproxy.Config
		want string
	}{
		{wslproxy.Config{Socket: wslproxy.DefaultSocket, CheckInterval: -time.Second}, "--wslProxyCheckInterval must not be negative, got -1s"},
	} {
		_, err := wslproxy.New(tt.cfg)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%+v) = %v, want an error with %q", tt.cfg, err, tt.want)
		}
	}
	if _, err := wslproxy.New(wslproxy.Config{}); err != nil {
		t.Errorf("the default socket with the zero rest: %v", err)
	}
}

// TestNothingOutlivesTheCalls: the sink holds no connection, so it has no
// Close: once Send and WatchPeer have returned, the connection the send
// made is closed at wsl-proxy's end too, and no goroutine is left.
func TestNothingOutlivesTheCalls(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	path := filepath.Join(t.TempDir(), "wsl-proxy.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	s := newSink(t, wslproxy.Config{Socket: path, CheckInterval: 10 * time.Millisecond})
	if err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 11231, 1)}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	s.WatchPeer(ctx, func() {})
	c := <-accepted
	if c == nil {
		t.Fatal("the send's connection was not accepted")
	}
	defer c.Close()
	// A connection the sink closed reads to its end; one it left open
	// runs into the deadline.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("the send's connection is still open: %v", err)
	}
	if _, ok := any(s).(io.Closer); ok {
		t.Error("the sink has a Close but holds nothing")
	}
	ln.Close()
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}

func TestExactPayload(t *testing.T) {
	p := startPeer(t, nil)
	s := newSink(t, wslproxy.Config{Socket: p.Path})
	m := sinktest.Mapping("docker", "c1", 11201, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, "2 messages at the peer", func() (bool, string) {
		n := len(p.Received())
		return n >= 2, fmt.Sprintf("%d so far", n)
	})
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
	s := newSink(t, wslproxy.Config{Socket: p.Path})
	m := sinktest.Mapping("docker", "web", 11211, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	testenv.Eventually(t, 5*time.Second, "the peer to listen on 127.0.0.1:11211", func() (bool, string) {
		c, err = net.Dial("tcp", "127.0.0.1:11211")
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
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
	s := newSink(t, wslproxy.Config{Socket: filepath.Join(t.TempDir(), "absent.sock")})
	err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 11221, 1)})
	if !errors.Is(err, core.ErrPeerDown) || !strings.Contains(err.Error(), "absent.sock") {
		t.Errorf("err = %v, want ErrPeerDown naming the socket", err)
	}
}

// TestPeerThatStalls: a socket that never reads must not block Send
// beyond its context.
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
	s := newSink(t, wslproxy.Config{Socket: path})
	go func() { done <- s.Send(ctx, core.Change{Mapping: big}) }()
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
	r.AddSink(wslproxy.Name, newSink(t, wslproxy.Config{Socket: p.Path}), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	m := sinktest.Mapping("docker", "c1", 11211, 1)
	sctp := m.Ports[0]
	sctp.Protocol, sctp.HostPort = core.SCTP, 11212
	m.Ports = append(m.Ports, sctp)
	r.Emitter("docker").Set(m)
	testenv.Eventually(t, 10*time.Second, "the sctp port unsupported and the tcp one exposed", func() (bool, string) {
		var states []string
		for _, ps := range r.Status().Ports {
			for _, at := range ps.Sinks {
				states = append(states, fmt.Sprintf("%s/%d %s", ps.Protocol, ps.HostPort, at.State))
			}
		}
		status := strings.Join(states, ", ")
		return status == "sctp/11212 unsupported, tcp/11211 exposed", "status " + status
	})
	for _, pm := range p.Received() {
		for key := range pm.Ports {
			if strings.HasSuffix(key.String(), "/sctp") {
				t.Errorf("wsl-proxy was sent %s", key)
			}
		}
	}
}
