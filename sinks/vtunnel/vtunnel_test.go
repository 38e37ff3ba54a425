package vtunnel_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/vtunnel"
	"github.com/guestagent/guestagent/sinks/vtunnel/vtunneltest"
	"github.com/guestagent/guestagent/wire"
)

// startPeer runs a test peer on a loopback TCP port until the test ends,
// and fails the test on any error the peer met.
func startPeer(t *testing.T) *vtunneltest.Peer {
	t.Helper()
	p := &vtunneltest.Peer{}
	p.Start(listen(t, "127.0.0.1:0"))
	t.Cleanup(func() {
		p.Stop()
		if err := p.Err(); err != nil {
			t.Errorf("peer errors: %v", err)
		}
	})
	return p
}

func listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func newSink(t *testing.T, cfg vtunnel.Config) *vtunnel.Sink {
	t.Helper()
	s, err := vtunnel.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// waitMessages waits until the peer has taken n messages and returns them.
func waitMessages(t *testing.T, p *vtunneltest.Peer, n int) []wire.PortMapping {
	t.Helper()
	testenv.Eventually(t, 5*time.Second, strconv.Itoa(n)+" messages at the peer", func() (bool, string) {
		got := len(p.Received())
		return got >= n, strconv.Itoa(got) + " so far"
	})
	return p.Received()
}

// TestContractOverTCP runs the contract suite with the sink's connectAddrs
// from lo, as the agent sends them from eth0. A restart is one the sink's
// check must notice (nothing is sent meanwhile): the peer comes back once
// the check has logged it down.
func TestContractOverTCP(t *testing.T) {
	p := startPeer(t)
	addr := p.Addr().String()
	obs, logs := observer.New(zap.WarnLevel)
	down := func() int { return logs.FilterMessageSnippet("not answering").Len() }
	restart := func(t *testing.T, during func()) {
		before := down()
		p.Stop()
		during()
		testenv.Eventually(t, 10*time.Second, "the check to find the peer down", func() (bool, string) {
			return down() > before, "no warning yet"
		})
		p.Start(listen(t, addr))
	}
	sinktest.Run(t, sinktest.Harness{
		New: func(t *testing.T) core.Sink {
			return newSink(t, vtunnel.Config{Addr: addr, Interface: "lo", CheckInterval: 50 * time.Millisecond, Log: zap.New(obs)})
		},
		State:   func(*testing.T) []string { return p.State() },
		Restart: func(t *testing.T) { restart(t, func() {}) },
		Outage:  restart,
	})
}

func TestConnectAddrsFromInterface(t *testing.T) {
	p := startPeer(t)
	s := newSink(t, vtunnel.Config{Addr: p.Addr().String(), Interface: "lo"})
	m := sinktest.Mapping("docker", "c", 41301, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	msgs := waitMessages(t, p, 1)
	if len(msgs) != 1 {
		t.Fatalf("received %d messages", len(msgs))
	}
	var lo bool
	for _, a := range msgs[0].ConnectAddrs {
		lo = lo || (a.Network == "ip+net" && a.Addr == "127.0.0.1/8")
	}
	if !lo {
		t.Errorf("connectAddrs = %+v, want lo's 127.0.0.1/8", msgs[0].ConnectAddrs)
	}
}

// TestNoInterfaceKeepsTheMappingsOwnAddrs: with Interface "" the
// mapping's own connectAddrs go.
func TestNoInterfaceKeepsTheMappingsOwnAddrs(t *testing.T) {
	p := startPeer(t)
	s := newSink(t, vtunnel.Config{Addr: p.Addr().String()})
	m := sinktest.Mapping("docker", "c", 41302, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	msgs := waitMessages(t, p, 1)
	if len(msgs[0].ConnectAddrs) != 1 || msgs[0].ConnectAddrs[0] != m.ConnectAddrs[0] {
		t.Errorf("connectAddrs = %+v, want the mapping's %+v", msgs[0].ConnectAddrs, m.ConnectAddrs)
	}
}

func TestAddressParsing(t *testing.T) {
	for _, good := range []string{"127.0.0.1:3040", "tcp://127.0.0.1:3040", "vsock://3:3040", "[::1]:3040"} {
		if _, err := vtunnel.Dialer(good); err != nil {
			t.Errorf("%q refused: %v", good, err)
		}
	}
	for _, bad := range []string{"", "127.0.0.1", "udp://127.0.0.1:1", "vsock://x:1", "vsock://2", "vsock://1:99999999999"} {
		if _, err := vtunnel.Dialer(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestConfigIsChecked: New refuses what the flags would refuse, naming
// the flag and the value.
func TestConfigIsChecked(t *testing.T) {
	for _, tt := range []struct {
		cfg  vtunnel.Config
		want string
	}{
		{vtunnel.Config{Addr: "udp://127.0.0.1:1"}, `--vtunnelAddr "udp://127.0.0.1:1"`},
		{vtunnel.Config{Addr: vtunnel.DefaultAddr, CheckInterval: -time.Second}, "--vtunnelCheckInterval must not be negative, got -1s"},
	} {
		_, err := vtunnel.New(tt.cfg)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%+v) = %v, want an error with %q", tt.cfg, err, tt.want)
		}
	}
	if _, err := vtunnel.New(vtunnel.Config{}); err != nil {
		t.Errorf("the zero Config (the default address): %v", err)
	}
}

func TestPeerDownIsReported(t *testing.T) {
	ln := listen(t, "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	err := newSink(t, vtunnel.Config{Addr: addr}).Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 41311, 1)})
	if !errors.Is(err, core.ErrPeerDown) || !strings.Contains(err.Error(), addr) {
		t.Errorf("err = %v, want ErrPeerDown naming %s", err, addr)
	}
}

// TestNothingOutlivesTheCalls: the sink holds no connection, so it has no
// Close: once Send and WatchPeer have returned, every connection they made
// is closed at the peer's end too, and no goroutine is left.
func TestNothingOutlivesTheCalls(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	ln := listen(t, "127.0.0.1:0")
	conns := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(conns)
				return
			}
			conns <- c
		}
	}()
	s := newSink(t, vtunnel.Config{Addr: ln.Addr().String(), CheckInterval: 10 * time.Millisecond})
	if err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 41331, 1)}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.WatchPeer(ctx, func() {}) }()
	var seen []net.Conn
	for len(seen) < 3 { // the send's and two checks'
		seen = append(seen, <-conns)
	}
	cancel()
	<-done
	ln.Close()
	for c := range conns {
		seen = append(seen, c)
	}
	for i, c := range seen {
		// A connection the sink closed reads to its end; one it left
		// open runs into the deadline.
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); err != nil {
			t.Errorf("connection %d is still open: %v", i, err)
		}
		c.Close()
	}
	if _, ok := any(s).(interface{ Close() error }); ok {
		t.Error("the sink has a Close but holds nothing")
	}
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}

// TestVsock exercises the AF_VSOCK transport: it listens on a vsock port
// and sends to it through the local CID. Where the kernel has a vsock
// loopback the message makes the round trip; where it has not, only the
// socket and listen calls run and the send must fail as PeerDown.
func TestVsock(t *testing.T) {
	testenv.Integration(t)
	ln, err := vsock.Listen(0, nil)
	if err != nil {
		t.Skipf("AF_VSOCK unavailable on this kernel: %v", err)
	}
	port := ln.Addr().(*vsock.Addr).Port
	p := &vtunneltest.Peer{}
	p.Start(ln)
	defer func() {
		p.Stop()
		if err := p.Err(); err != nil {
			t.Errorf("peer errors: %v", err)
		}
	}()
	s := newSink(t, vtunnel.Config{Addr: "vsock://1:" + strconv.FormatUint(uint64(port), 10)})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = s.Send(ctx, core.Change{Mapping: sinktest.Mapping("d", "a", 41321, 1)})
	if err != nil {
		if !errors.Is(err, core.ErrPeerDown) {
			t.Fatalf("vsock send failed without ErrPeerDown: %v", err)
		}
		t.Logf("no vsock loopback in this kernel: listen ran, the send failed cleanly (%v)", err)
		return
	}
	if msgs := waitMessages(t, p, 1); len(msgs) != 1 {
		t.Fatalf("vsock loopback: %d messages arrived, want 1", len(msgs))
	}
	t.Log("vsock loopback round trip ran")
}

// TestVsockDialFollowsTheContext sends to a vsock port where nothing
// listens with a context that ends first: the send gives up with the
// context's error, not whatever the kernel answers later.
func TestVsockDialFollowsTheContext(t *testing.T) {
	testenv.Integration(t)
	ln, err := vsock.Listen(0, nil)
	if err != nil {
		t.Skipf("AF_VSOCK unavailable on this kernel: %v", err)
	}
	port := ln.Addr().(*vsock.Addr).Port
	_ = ln.Close() // nothing listens there now
	s := newSink(t, vtunnel.Config{Addr: "vsock://1:" + strconv.FormatUint(uint64(port), 10)})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err = s.Send(ctx, core.Change{Mapping: sinktest.Mapping("d", "a", 41322, 1)})
	if err == nil {
		t.Fatal("a send to a port nobody listens on succeeded")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("send error %v; want the context's deadline (if the kernel refused at once, this test proves nothing here)", err)
	}
}
