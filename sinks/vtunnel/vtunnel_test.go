package vtunnel_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/sinks/vtunnel"
	"github.com/guestagent/guestagent/wire"
)

// peer records the PortMappings it is sent, one per connection, and keeps
// the resulting set of exposed bindings; connections without a message
// (probes) are ignored.
type peer struct {
	mu       sync.Mutex
	ln       net.Listener
	addr     string
	exposed  map[string]bool
	received []wire.PortMapping
	errs     []error
	wg       sync.WaitGroup
}

func (p *peer) start(t *testing.T, ln net.Listener) {
	t.Helper()
	p.mu.Lock()
	p.ln, p.addr, p.exposed = ln, ln.Addr().String(), map[string]bool{}
	p.mu.Unlock()
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.handle(c)
		}
	})
}

func (p *peer) listenTCP(t *testing.T, addr string) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	p.start(t, ln)
}

func (p *peer) stop() {
	p.mu.Lock()
	ln := p.ln
	p.ln, p.exposed = nil, nil
	p.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	p.wg.Wait()
}

func (p *peer) handle(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	data, err := io.ReadAll(io.LimitReader(c, 1<<20))
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	if len(data) == 0 {
		return // a probe
	}
	var pm wire.PortMapping
	if err := json.Unmarshal(data, &pm); err != nil {
		p.errs = append(p.errs, err)
		return
	}
	p.received = append(p.received, pm)
	ports, err := wire.ParsePorts(pm.Ports)
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	for _, port := range ports {
		if p.exposed != nil {
			p.exposed[sinktest.Entry(port)] = !pm.Remove
		}
	}
}

func (p *peer) state() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for e, on := range p.exposed {
		if on {
			out = append(out, e)
		}
	}
	slices.Sort(out)
	return out
}

func (p *peer) messages() []wire.PortMapping {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.received)
}

func newSink(t *testing.T, addr, iface string, every time.Duration) *vtunnel.Sink {
	t.Helper()
	s, err := vtunnel.New(addr, iface, every, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestContractOverTCP(t *testing.T) {
	p := &peer{}
	p.listenTCP(t, "127.0.0.1:0")
	defer p.stop()
	addr := p.addr
	const probe = 50 * time.Millisecond
	restart := func(t *testing.T, during func()) {
		p.stop()
		during()
		time.Sleep(4 * probe) // down long enough for a probe to notice
		p.listenTCP(t, addr)
	}
	sinktest.Run(t, sinktest.Harness{
		New:     func(t *testing.T) core.Sink { return newSink(t, addr, "", probe) },
		State:   func(*testing.T) []string { return p.state() },
		Restart: func(t *testing.T) { restart(t, func() {}) },
		Outage:  restart,
	})
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.errs) > 0 {
		t.Errorf("peer errors: %v", errors.Join(p.errs...))
	}
}

func TestConnectAddrsFromInterface(t *testing.T) {
	p := &peer{}
	p.listenTCP(t, "127.0.0.1:0")
	defer p.stop()
	s := newSink(t, p.addr, "lo", 0)
	m := sinktest.Mapping("docker", "c", 41301, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(p.messages()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	msgs := p.messages()
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

func TestPeerDownIsReported(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	err = newSink(t, addr, "", 0).Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 41311, 1)})
	if !errors.Is(err, core.ErrPeerDown) || !strings.Contains(err.Error(), addr) {
		t.Errorf("err = %v, want ErrPeerDown naming %s", err, addr)
	}
}

// TestVsock exercises the AF_VSOCK transport: it listens on a vsock port
// and sends to it through the local CID. Where the kernel has a vsock
// loopback the message makes the round trip; where it has not, only the
// socket and listen calls run and the send must fail as PeerDown.
func TestVsock(t *testing.T) {
	ln, err := vsock.Listen(0, nil)
	if err != nil {
		t.Skipf("AF_VSOCK unavailable on this kernel: %v", err)
	}
	port := ln.Addr().(*vsock.Addr).Port
	p := &peer{}
	p.start(t, ln)
	defer p.stop()
	s := newSink(t, "vsock://1:"+strconv.FormatUint(uint64(port), 10), "", 0)
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
	deadline := time.Now().Add(5 * time.Second)
	for len(p.messages()) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(p.messages()) != 1 {
		t.Fatal("vsock loopback: the message did not arrive")
	}
	t.Log("vsock loopback round trip ran")
}

// TestVsockDialFollowsTheContext sends to a vsock port where nothing
// listens with a context that ends first: the send gives up with the
// context's error, not whatever the kernel answers later.
func TestVsockDialFollowsTheContext(t *testing.T) {
	ln, err := vsock.Listen(0, nil)
	if err != nil {
		t.Skipf("AF_VSOCK unavailable on this kernel: %v", err)
	}
	port := ln.Addr().(*vsock.Addr).Port
	_ = ln.Close() // nothing listens there now
	s := newSink(t, "vsock://1:"+strconv.FormatUint(uint64(port), 10), "", 0)
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
