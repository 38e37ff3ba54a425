package wslproxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
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
		if n := p.Truncated(); n > 0 {
			t.Errorf("peer got %d messages cut short", n)
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
		{wslproxy.Config{UpstreamInterface: "veth-rd-ns"}, "give both or neither"},
		{wslproxy.Config{UpstreamAddr: "192.168.143.1"}, "give both or neither"},
		{wslproxy.Config{UpstreamInterface: "veth-rd-ns", UpstreamAddr: "fd00::1"}, `--wslProxyUpstreamAddr "fd00::1" is not a unicast IPv4 address`},
		{wslproxy.Config{UpstreamInterface: "veth-rd-ns", UpstreamAddr: "127.0.0.1"}, "is not a unicast IPv4 address"},
	} {
		_, err := wslproxy.New(tt.cfg)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%+v) = %v, want an error with %q", tt.cfg, err, tt.want)
		}
	}
	s, err := wslproxy.New(wslproxy.Config{})
	if err != nil {
		t.Fatalf("the default socket with the zero rest: %v", err)
	}
	if e, ok := s.Entrance(); ok {
		t.Errorf("the zero Config has the entrance %v", e)
	}
	s, err = wslproxy.New(wslproxy.Config{UpstreamInterface: wslproxy.DefaultUpstreamInterface, UpstreamAddr: wslproxy.DefaultUpstreamAddr})
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := s.Entrance(); !ok || e.String() != "wsl-proxy: veth-rd-ns 192.168.143.1" {
		t.Errorf("Entrance() = %v, %v; want wsl-proxy's upstream", e, ok)
	}
}

// TestNothingOutlivesTheCalls: the sink holds no connection, so it has no
// Close: a send returns once wsl-proxy closed its connection (here, as
// wsl-proxy does, once it has read the message), and once Send and
// WatchPeer have returned, no descriptor or goroutine of theirs is left.
func TestNothingOutlivesTheCalls(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	path := filepath.Join(t.TempDir(), "wsl-proxy.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	read := make(chan []byte, 1)
	go func() {
		defer close(read)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c) // to the sink's half-close
		if err == nil {
			read <- b
		}
	}()
	fds := openFiles(t)
	s := newSink(t, wslproxy.Config{Socket: path, CheckInterval: 10 * time.Millisecond})
	if err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 11231, 1)}); err != nil {
		t.Fatal(err)
	}
	if b := <-read; len(b) == 0 {
		t.Fatal("the peer did not read a message ending in the sink's half-close")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	s.WatchPeer(ctx, func() {})
	if got := openFiles(t); got != fds {
		t.Errorf("%d descriptors open after the calls, %d before", got, fds)
	}
	if _, ok := any(s).(io.Closer); ok {
		t.Error("the sink has a Close but holds nothing")
	}
	ln.Close()
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}

// openFiles counts the test process's open descriptors.
func openFiles(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// TestPeerThatNeverCloses: a peer that reads the message but keeps the
// connection open has not said it applied it: the send fails when its
// context ends, and is not taken for an outage.
func TestPeerThatNeverCloses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "open.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	held := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = io.ReadAll(c)
		held <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	s := newSink(t, wslproxy.Config{Socket: path})
	err = s.Send(ctx, core.Change{Mapping: sinktest.Mapping("d", "a", 11232, 1)})
	if err == nil || errors.Is(err, core.ErrPeerDown) {
		t.Errorf("err = %v, want a failure that is not PeerDown", err)
	}
	select {
	case c := <-held:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Error("the peer never read the message")
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

// TestRemoveThenAddKeepsThePort sends the remove of a port and the add
// that follows it, 200 times, to a peer that applies each connection's
// message in a goroutine of its own after a random delay, as wsl-proxy's
// goroutines may be scheduled: after each pair the port is open, at the
// address of the add (the address changes every round, and an add applied
// before the remove would fail on the port still open, or be undone by
// it).
func TestRemoveThenAddKeepsThePort(t *testing.T) {
	p := run(t, &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), Jitter: 2 * time.Millisecond})
	s := newSink(t, wslproxy.Config{Socket: p.Path})
	port := uint16(testenv.FreePort(t))
	mapping := func(round int) core.Mapping {
		m := sinktest.Mapping("docker", "c1", port, 1)
		if round%2 == 1 {
			m.Ports[0].HostIP = netip.IPv4Unspecified()
		}
		return m
	}
	ctx := context.Background()
	if err := s.Send(ctx, core.Change{Mapping: mapping(0)}); err != nil {
		t.Fatal(err)
	}
	for round := 1; round <= 200; round++ {
		if err := s.Send(ctx, core.Change{Remove: true, Mapping: mapping(round - 1)}); err != nil {
			t.Fatal(err)
		}
		if err := s.Send(ctx, core.Change{Mapping: mapping(round)}); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 5*time.Second, "the peer to apply both", func() (bool, string) {
			n := len(p.Received())
			return n == 1+2*round, fmt.Sprintf("%d messages so far", n)
		})
		want := wslproxytest.Entry(mapping(round).Ports[0])
		if got := p.State(); len(got) != 1 || got[0] != want {
			t.Fatalf("round %d: the peer listens on %q, want %q", round, got, want)
		}
		if err := p.Err(); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
}

// TestChurnThroughTheRouter: a router in front of the same peer, whose
// source flips a mapping between two addresses of one port, and off, as
// fast as it can: once the source stops, the peer listens on the port at
// the address the source last set.
func TestChurnThroughTheRouter(t *testing.T) {
	p := run(t, &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), Jitter: 2 * time.Millisecond})
	r := core.NewRouter(core.RouterConfig{})
	r.AddSink(wslproxy.Name, newSink(t, wslproxy.Config{Socket: p.Path}), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	port := uint16(testenv.FreePort(t))
	out := r.Emitter("docker")
	var last core.Mapping
	for i := range 300 {
		m := sinktest.Mapping("docker", "c1", port, 1)
		if i%3 == 1 {
			m.Ports[0].HostIP = netip.IPv4Unspecified()
		}
		if i%3 == 2 {
			out.Delete("c1")
		} else {
			out.Set(m)
			last = m
		}
		if i%10 == 0 {
			time.Sleep(time.Duration(i%7) * time.Millisecond)
		}
	}
	out.Set(last)
	want := wslproxytest.Entry(last.Ports[0])
	testenv.Eventually(t, 10*time.Second, "the peer to listen on "+want, func() (bool, string) {
		got := p.State()
		return len(got) == 1 && got[0] == want, fmt.Sprintf("it listens on %q", got)
	})
	// And stays so: nothing still in flight undoes it.
	time.Sleep(100 * time.Millisecond)
	if got := p.State(); len(got) != 1 || got[0] != want {
		t.Errorf("then the peer listens on %q, want %q", got, want)
	}
}

// TestComingBackEndsTheBackoff: a router whose sink finds no wsl-proxy
// waits a minute before it tries again; wsl-proxy starting ends that wait
// at once, as its socket appears (seen through inotify: the check
// interval is an hour).
func TestComingBackEndsTheBackoff(t *testing.T) {
	p := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true}
	obs, logs := observer.New(zap.InfoLevel)
	r := core.NewRouter(core.RouterConfig{Backoff: core.Backoff{Initial: time.Minute, Max: time.Minute}, Log: zap.New(obs)})
	r.AddSink(wslproxy.Name, newSink(t, wslproxy.Config{Socket: p.Path, CheckInterval: time.Hour, Log: zap.New(obs)}), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	m := sinktest.Mapping("docker", "c1", 11241, 1)
	r.Emitter("docker").Set(m)
	testenv.Eventually(t, 10*time.Second, "the sink to find wsl-proxy missing", func() (bool, string) {
		return logs.FilterMessage("peer unreachable; will retry").Len() > 0, "not yet"
	})
	// The socket appears listening (bound elsewhere and moved into
	// place): one that is bound but not yet listening refuses the retry,
	// which then waits the backoff's first step (250 ms by default).
	final := p.Path
	p.Path = filepath.Join(filepath.Dir(final), "binding.sock")
	run(t, p)
	if err := os.Rename(p.Path, final); err != nil {
		t.Fatal(err)
	}
	p.Path = final
	want := wslproxytest.Entry(m.Ports[0])
	testenv.Eventually(t, 15*time.Second, "the port at wsl-proxy, well before the minute's backoff ends", func() (bool, string) {
		got := p.State()
		return len(got) == 1 && got[0] == want, fmt.Sprintf("it holds %q", got)
	})
}
