package sockets_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/sockets"
)

// relayAddr is the guest namespace's address on its link to the host
// namespace, standing in for the guest IP on host-switch's network.
const relayAddr = "198.18.90.2"

// relayRig is a rig whose namespace (the guest) has relayAddr on a veth
// link to a second namespace (the host), from which traffic to the relay
// comes.
type relayRig struct {
	*rig
	host     string // path of the host namespace
	hostName string // its name
}

func newRelayRig(t testing.TB) *relayRig {
	t.Helper()
	r := newRig(t)
	host := testenv.Netns(t)
	loopbacknattest.Link(t,
		loopbacknattest.End{Netns: r.ns, Iface: "guest0", Addr: relayAddr + "/24"},
		loopbacknattest.End{Netns: host, Iface: "host0", Addr: "198.18.90.1/24"})
	return &relayRig{rig: r, host: loopbacknattest.NetnsPath(host), hostName: host}
}

func (r *relayRig) relaySource(t testing.TB, cfg sockets.Config) core.Source {
	t.Helper()
	cfg.Netns, cfg.Interval, cfg.Settle = r.netnsPath(), 20*time.Millisecond, 50*time.Millisecond
	s, err := sockets.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (r *relayRig) dial(t *testing.T, network string, port int) net.Conn {
	t.Helper()
	c, err := loopbacknattest.DialNetworkFrom(r.host, network, fmt.Sprintf("%s:%d", relayAddr, port))
	if err != nil {
		t.Fatalf("dial %s %s:%d from the host namespace: %v", network, relayAddr, port, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	return c
}

// checkTCP talks to the helper's TCP echo server through the relay: a
// line and its echo, then a half-close, after which the server's "bye"
// and its own end of stream still arrive.
func (r *relayRig) checkTCP(t *testing.T, port int) {
	t.Helper()
	c := r.dial(t, "tcp4", port)
	br := bufio.NewReader(c)
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := br.ReadString('\n'); err != nil || line != "hello\n" {
		t.Fatalf("echo through the relay of port %d: %q, %v", port, line, err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(br); err != nil || string(rest) != "bye\n" {
		t.Fatalf("after a half-close, port %d answered %q, %v; want %q and the end of stream", port, rest, err, "bye\n")
	}
}

// checkUDP sends a datagram to the helper's UDP echo server through the
// relay and reads the reply, which must come from the relay address.
func (r *relayRig) checkUDP(t *testing.T, port int) {
	t.Helper()
	c := r.dial(t, "udp4", port) // connected: only replies from relayAddr:port arrive
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "echo:ping" {
		t.Fatalf("UDP through the relay of port %d: %q, %v", port, buf[:n], err)
	}
}

// refused fails t unless the relay address refuses port: a TCP connection
// is reset, a UDP datagram draws a port-unreachable error.
func (r *relayRig) refused(t *testing.T, network string, port int) {
	t.Helper()
	c, err := loopbacknattest.DialNetworkFrom(r.host, network, fmt.Sprintf("%s:%d", relayAddr, port))
	if err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		_, err = io.WriteString(c, "ping")
		if err == nil {
			_, err = c.Read(make([]byte, 64))
		}
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("%s %s:%d: %v; want the connection refused", network, relayAddr, port, err)
	}
}

// TestRelayReachesLoopbackListenersFromTheRelayAddress serves TCP and UDP
// on 127.0.0.1 and ::1 inside the guest namespace and talks to them from
// the host namespace through the relay address; a socket on 0.0.0.0 gets
// no relay; the relay's own sockets are never reported; each relay goes
// with its socket, and nothing of it outlives Run.
func TestRelayReachesLoopbackListenersFromTheRelayAddress(t *testing.T) {
	r := newRelayRig(t)
	ignore := goleak.IgnoreCurrent()
	obs, logs := observer.New(zap.DebugLevel)
	src := r.relaySource(t, sockets.Config{RelayAddr: relayAddr, Log: zap.New(obs)})
	router := core.NewRouter(core.RouterConfig{})
	rec := &recorder{out: router.Emitter(sockets.Name)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, rec) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v", err)
		}
	}()

	tcp4, udp4, tcp6, udp6, wild := r.nextPort(), r.nextPort(), r.nextPort(), r.nextPort(), r.nextPort()
	r.h.do(t, "serve tcp 127.0.0.1:%d", tcp4)
	r.h.do(t, "serve udp 127.0.0.1:%d", udp4)
	r.h.do(t, "serve tcp [::1]:%d", tcp6)
	r.h.do(t, "serve udp [::1]:%d", udp6)
	r.h.do(t, "serve tcp 0.0.0.0:%d", wild)
	// A relay is started before its mapping is handed on.
	waitIDs(t, router,
		fmt.Sprintf("tcp/127.0.0.1:%d", tcp4), fmt.Sprintf("udp/127.0.0.1:%d", udp4),
		fmt.Sprintf("tcp/[::1]:%d", tcp6), fmt.Sprintf("udp/[::1]:%d", udp6),
		fmt.Sprintf("tcp/0.0.0.0:%d", wild))

	r.checkTCP(t, tcp4)
	r.checkUDP(t, udp4)
	r.checkTCP(t, tcp6)
	r.checkUDP(t, udp6)
	// 0.0.0.0 is reachable on the relay address by itself.
	r.checkTCP(t, wild)
	if n := logs.FilterMessage("relay started").FilterField(zap.String("id", fmt.Sprintf("tcp/0.0.0.0:%d", wild))).Len(); n != 0 {
		t.Errorf("a listener on 0.0.0.0 got a relay")
	}
	if n := logs.FilterMessage("relay started").Len(); n != 4 {
		t.Errorf("%d relays started, want 4", n)
	}

	// The relay's sockets have been through scans by now; they are the
	// agent's own and never reported.
	r.barrier(t, router)
	for _, p := range []int{tcp4, udp4, tcp6, udp6} {
		for _, proto := range []string{"tcp", "udp"} {
			if got := rec.mentions(fmt.Sprintf("%s/%s:%d", proto, relayAddr, p)); len(got) != 0 {
				t.Errorf("the relay's socket was reported: %v", got)
			}
		}
	}

	r.h.do(t, "close tcp 127.0.0.1:%d", tcp4)
	r.h.do(t, "close udp 127.0.0.1:%d", udp4)
	waitIDs(t, router, fmt.Sprintf("tcp/[::1]:%d", tcp6), fmt.Sprintf("udp/[::1]:%d", udp6), fmt.Sprintf("tcp/0.0.0.0:%d", wild))
	r.refused(t, "tcp4", tcp4)
	r.refused(t, "udp4", udp4)
	r.checkTCP(t, tcp6)

	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v", err)
	}
	done <- nil // for the deferred wait
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("goroutines left behind after Run returned: %v", err)
	}
	r.refused(t, "tcp4", tcp6)
}

// TestRelayLimitsConnectionsAndEndsIdleOnes relays with room for one
// connection and a short idle time.
func TestRelayLimitsConnectionsAndEndsIdleOnes(t *testing.T) {
	r := newRelayRig(t)
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr, RelayMaxConns: 1, RelayIdle: 300 * time.Millisecond}))
	p := r.nextPort()
	r.h.do(t, "serve tcp 127.0.0.1:%d", p)
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", p))

	first := r.dial(t, "tcp4", p)
	if _, err := io.WriteString(first, "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first, make([]byte, 1)); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	// The second one is reset while the first holds the only slot.
	// The reset may come before the dial returns.
	second, err := loopbacknattest.DialNetworkFrom(r.host, "tcp4", fmt.Sprintf("%s:%d", relayAddr, p))
	if err == nil {
		defer second.Close()
		_ = second.SetDeadline(time.Now().Add(waitTimeout))
		_, err = second.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) && err != io.EOF {
		t.Errorf("second connection: %v; want it reset", err)
	}
	// Idle, the first one is closed by the relay (not by its deadline).
	if n, err := first.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("idle connection read %d bytes, %v; want it closed", n, err)
	}
	// Its slot is free again.
	testenv.Eventually(t, waitTimeout, "a new connection through the relay", func() (bool, string) {
		c, err := loopbacknattest.DialNetworkFrom(r.host, "tcp4", fmt.Sprintf("%s:%d", relayAddr, p))
		if err != nil {
			return false, err.Error()
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitTimeout))
		if _, err := io.WriteString(c, "y"); err != nil {
			return false, err.Error()
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			return false, err.Error()
		}
		return string(b) == "y", fmt.Sprintf("read %q", b)
	})
}

// TestRelaySkipsWhatItCannotBind starts the source with a relay address
// the namespace does not have, and with one whose port another process
// holds: both are logged and skipped, and the sockets still reported.
func TestRelaySkipsWhatItCannotBind(t *testing.T) {
	r := newRelayRig(t)
	obs, logs := observer.New(zap.DebugLevel)
	p, q, taken := r.nextPort(), r.nextPort(), r.nextPort()
	r.h.do(t, "serve tcp 127.0.0.1:%d", p)
	r.h.do(t, "listen udp 127.0.0.1:%d", q)
	missing, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: "198.18.91.9", Log: zap.New(obs)}))
	waitIDs(t, missing, fmt.Sprintf("tcp/127.0.0.1:%d", p), fmt.Sprintf("udp/127.0.0.1:%d", q))
	if n := logs.FilterMessageSnippet("not assigned").Len(); n != 1 {
		t.Errorf("a missing relay address was logged %d times, want once", n)
	}

	r.h.do(t, "listen tcp %s:%d", relayAddr, taken)
	r.h.do(t, "serve tcp 127.0.0.1:%d", taken)
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr, Log: zap.New(obs)}))
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", taken))
	if n := logs.FilterMessageSnippet("taken on the relay address").Len(); n != 1 {
		t.Errorf("a taken port was logged %d times, want once", n)
	}
	// The relay of the other port works.
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", p))
	r.checkTCP(t, p)
}

// TestRelayLimitsUDPSessionsAndEndsIdleOnes relays UDP with room for one
// client session and a short idle time: a second client's datagrams are
// dropped while the first one's session lives, and served once it has
// been idle long enough to end.
func TestRelayLimitsUDPSessionsAndEndsIdleOnes(t *testing.T) {
	r := newRelayRig(t)
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr, RelayMaxConns: 1, RelayUDPIdle: 500 * time.Millisecond}))
	p := r.nextPort()
	r.h.do(t, "serve udp 127.0.0.1:%d", p)
	waitHas(t, router, fmt.Sprintf("udp/127.0.0.1:%d", p))

	first := r.dial(t, "udp4", p)
	second := r.dial(t, "udp4", p)
	exchange := func(c net.Conn, payload string, wait time.Duration) error {
		_ = c.SetDeadline(time.Now().Add(wait))
		if _, err := io.WriteString(c, payload); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if got := string(buf[:n]); got != "echo:"+payload {
			return fmt.Errorf("reply %q", got)
		}
		return nil
	}
	if err := exchange(first, "one", waitTimeout); err != nil {
		t.Fatalf("first client: %v", err)
	}
	// While the first session is busy, the second client gets nothing.
	for i := range 3 {
		if err := exchange(first, fmt.Sprintf("keep%d", i), waitTimeout); err != nil {
			t.Fatalf("first client: %v", err)
		}
		if err := exchange(second, fmt.Sprintf("two%d", i), 100*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("second client while the only session is busy: %v; want no reply", err)
		}
	}
	// The first session ends after its idle time; the second client is
	// then served.
	testenv.Eventually(t, waitTimeout, "the second client served once the first session idled out", func() (bool, string) {
		err := exchange(second, "late", 200*time.Millisecond)
		return err == nil, fmt.Sprint(err)
	})
}

// TestRelayMovesBetweenLoopbackAddresses serves one port on 127.0.0.1 and
// ::1 at once, as a server bound to "localhost" does: the relay forwards to
// the first, and when that one closes it moves to the other, which stays
// reachable; when both are gone the relay is too.
func TestRelayMovesBetweenLoopbackAddresses(t *testing.T) {
	r := newRelayRig(t)
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr}))
	for _, proto := range []string{"tcp", "udp"} {
		p := r.nextPort()
		r.h.do(t, "serve %s 127.0.0.1:%d", proto, p)
		waitHas(t, router, fmt.Sprintf("%s/127.0.0.1:%d", proto, p))
		r.h.do(t, "serve %s [::1]:%d", proto, p)
		waitHas(t, router, fmt.Sprintf("%s/[::1]:%d", proto, p))
		check := r.checkTCP
		if proto == "udp" {
			check = r.checkUDP
		}
		check(t, p)
		r.h.do(t, "close %s 127.0.0.1:%d", proto, p)
		waitLacks(t, router, fmt.Sprintf("%s/127.0.0.1:%d", proto, p))
		check(t, p) // now through ::1
		r.h.do(t, "close %s [::1]:%d", proto, p)
		waitLacks(t, router, fmt.Sprintf("%s/[::1]:%d", proto, p))
		r.refused(t, proto+"4", p)
	}
}

// TestRelayAnswersOnlyThroughItsInterface: with RelayInterface, the
// relay's sockets are bound to the guest's link to the host namespace, so
// a namespace on another link of the guest (as a container on a bridge)
// that sends to the relay address is refused, TCP and UDP, while the host
// namespace is served; an entry (wsl-proxy's upstream) gets relays of its
// own, bound to its interface, and answers through it alike.
func TestRelayAnswersOnlyThroughItsInterface(t *testing.T) {
	r := newRelayRig(t)
	other := testenv.Netns(t)
	loopbacknattest.Link(t,
		loopbacknattest.End{Netns: r.ns, Iface: "bridge0", Addr: "198.18.92.1/24"},
		loopbacknattest.End{Netns: other, Iface: "eth0", Addr: "198.18.92.2/24"})
	testenv.RunIn(t, other, "ip", "route", "add", "198.18.0.0/16", "via", "198.18.92.1")
	wsl := testenv.Netns(t)
	loopbacknattest.Link(t,
		loopbacknattest.End{Netns: r.ns, Iface: "up0", Addr: "198.18.93.1/24"},
		loopbacknattest.End{Netns: wsl, Iface: "down0", Addr: "198.18.93.2/24"})
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr, RelayInterface: "guest0",
		Entries: []registry.Entry{{Sink: "wsl-proxy", Interface: "up0", Addr: netip.MustParseAddr("198.18.93.1")}}}))
	tcp, udp := r.nextPort(), r.nextPort()
	r.h.do(t, "serve tcp 127.0.0.1:%d", tcp)
	r.h.do(t, "serve udp 127.0.0.1:%d", udp)
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", tcp))
	waitHas(t, router, fmt.Sprintf("udp/127.0.0.1:%d", udp))
	testenv.Eventually(t, waitTimeout, "the relay to answer", func() (bool, string) {
		c, err := loopbacknattest.DialNetworkFrom(r.host, "tcp4", fmt.Sprintf("%s:%d", relayAddr, tcp))
		if err != nil {
			return false, err.Error()
		}
		c.Close()
		return true, ""
	})
	r.checkTCP(t, tcp)
	r.checkUDP(t, udp)
	otherNS, wslNS := loopbacknattest.NetnsPath(other), loopbacknattest.NetnsPath(wsl)
	for _, at := range []string{relayAddr, "198.18.93.1"} {
		addr := fmt.Sprintf("%s:%d", at, tcp)
		if _, err := loopbacknattest.DialFrom(otherNS, addr); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("tcp %s from another link of the guest: %v; want the connection refused", addr, err)
		}
	}
	c, err := loopbacknattest.DialFrom(wslNS, fmt.Sprintf("198.18.93.1:%d", tcp))
	if err != nil {
		t.Fatalf("the entry's relay: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := io.WriteString(c, "hi\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "hi\n" {
		t.Errorf("echo through the entry's relay: %q, %v", line, err)
	}
	// UDP from the other link: no reply, and an ICMP port unreachable.
	u, err := loopbacknattest.DialNetworkFrom(otherNS, "udp4", fmt.Sprintf("%s:%d", relayAddr, udp))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	_ = u.SetDeadline(time.Now().Add(2 * time.Second))
	_, _ = io.WriteString(u, "ping")
	if n, err := u.Read(make([]byte, 64)); err == nil {
		t.Errorf("UDP from another link of the guest got %d bytes back through the relay", n)
	}
}

// TestRelayFloodKeepsOtherClientsAndSaysSaturated floods a UDP and a TCP
// relay from one client address (many source ports, many connections):
// that client gets no more than its share, another client address is
// still served, the relays' limit of all holds, and the source's status
// line says the relays are saturated and counts what they refused.
func TestRelayFloodKeepsOtherClientsAndSaysSaturated(t *testing.T) {
	const perClient, total = 4, 10
	r := newRelayRig(t)
	const other = "198.18.90.3" // a second client address of the host namespace
	testenv.RunIn(t, r.hostName, "ip", "addr", "add", other+"/24", "dev", "host0")
	src := r.relaySource(t, sockets.Config{RelayAddr: relayAddr, RelayMaxPerClient: perClient, RelayMaxTotal: total})
	router, rec := run(t, src)
	u, p := r.nextPort(), r.nextPort()
	r.h.do(t, "serve udp 127.0.0.1:%d", u)
	r.h.do(t, "serve tcp 127.0.0.1:%d", p)
	waitHas(t, router, fmt.Sprintf("udp/127.0.0.1:%d", u))
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", p))

	dialFrom := func(network, from string, port int) (net.Conn, error) {
		return testenv.Within(r.hostName, func() (net.Conn, error) {
			d := net.Dialer{Timeout: waitTimeout}
			if from != "" {
				if network == "udp4" {
					d.LocalAddr = &net.UDPAddr{IP: net.ParseIP(from)}
				} else {
					d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
				}
			}
			return d.Dial(network, net.JoinHostPort(relayAddr, strconv.Itoa(port)))
		})
	}
	echoes := func(c net.Conn, payload string, wait time.Duration) bool {
		if c == nil {
			return false // reset while it was being made
		}
		_ = c.SetDeadline(time.Now().Add(wait))
		if _, err := io.WriteString(c, payload); err != nil {
			return false
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		return err == nil && (string(buf[:n]) == "echo:"+payload || string(buf[:n]) == payload)
	}
	open := func(network, from string, port int) net.Conn {
		t.Helper()
		c, err := dialFrom(network, from, port)
		if errors.Is(err, syscall.ECONNRESET) {
			return nil // refused: the reset may come before the dial returns
		}
		if err != nil {
			t.Fatalf("%s from %s: %v", network, from, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}

	// 20 source ports of one client: its share of sessions, no more.
	served := 0
	for range 20 {
		if echoes(open("udp4", "198.18.90.1", u), "flood", 300*time.Millisecond) {
			served++
		}
	}
	if served != perClient {
		t.Errorf("one client with 20 source ports got %d UDP sessions, want %d", served, perClient)
	}
	if c := open("udp4", other, u); !echoes(c, "other", waitTimeout) {
		t.Errorf("another client is locked out of the UDP relay")
	}
	// 10 connections of one client: its share, the rest reset.
	served = 0
	for range 10 {
		if echoes(open("tcp4", "198.18.90.1", p), "x", 300*time.Millisecond) {
			served++
		}
	}
	if served != perClient {
		t.Errorf("one client with 10 connections got %d served, want %d", served, perClient)
	}
	// The other client: one more fits the limit of all (4+1+4+1), the
	// next does not.
	if c := open("tcp4", other, p); !echoes(c, "y", waitTimeout) {
		t.Errorf("another client is locked out of the TCP relay")
	}
	if c := open("tcp4", other, p); echoes(c, "z", 300*time.Millisecond) {
		t.Errorf("a connection beyond the relays' limit of all (%d) was served", total)
	}
	testenv.Eventually(t, waitTimeout, "the status line to say the relays are saturated", func() (bool, string) {
		line := rec.status()
		return strings.Contains(line, "(saturated)") && strings.Contains(line, "refused at a limit") &&
			strings.Contains(line, fmt.Sprintf("%d of %d", total, total)), line
	})
	// And the metrics say so too.
	reg := prometheus.NewRegistry()
	reg.MustRegister(sockets.RelayCollector(src.(*sockets.Source)))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		m := f.GetMetric()[0]
		got[f.GetName()] = m.GetGauge().GetValue() + m.GetCounter().GetValue()
	}
	if got["guestagent_sockets_relay_active"] != total || got["guestagent_sockets_relay_max"] != total ||
		got["guestagent_sockets_relay_saturated"] != 1 || got["guestagent_sockets_relay_refused_total"] < 1 {
		t.Errorf("relay metrics %v, want %d of %d active, saturated, refusals counted", got, total, total)
	}
}

// TestRelayFollowsItsInterfaceMadeAgain binds the relay to the guest's
// link, then deletes the link and makes it again under the same name and
// address, as a restarted gvproxy makes its tap again: the relays, bound
// to the old device, are opened again on the new one and answer, over TCP
// and UDP, without the relayed sockets changing.
func TestRelayFollowsItsInterfaceMadeAgain(t *testing.T) {
	r := newRelayRig(t)
	router, _ := run(t, r.relaySource(t, sockets.Config{RelayAddr: relayAddr, RelayInterface: "guest0"}))
	tcp, udp := r.nextPort(), r.nextPort()
	r.h.do(t, "serve tcp 127.0.0.1:%d", tcp)
	r.h.do(t, "serve udp 127.0.0.1:%d", udp)
	waitHas(t, router, fmt.Sprintf("tcp/127.0.0.1:%d", tcp))
	waitHas(t, router, fmt.Sprintf("udp/127.0.0.1:%d", udp))
	answers := func(when string) {
		t.Helper()
		testenv.Eventually(t, waitTimeout, when+": the relay to answer", func() (bool, string) {
			c, err := loopbacknattest.DialNetworkFrom(r.host, "tcp4", fmt.Sprintf("%s:%d", relayAddr, tcp))
			if err != nil {
				return false, err.Error()
			}
			c.Close()
			return true, ""
		})
		r.checkTCP(t, tcp)
		r.checkUDP(t, udp)
	}
	answers("at first")
	for round := range 2 {
		testenv.RunIn(t, r.ns, "ip", "link", "delete", "guest0")
		loopbacknattest.Link(t,
			loopbacknattest.End{Netns: r.ns, Iface: "guest0", Addr: relayAddr + "/24"},
			loopbacknattest.End{Netns: r.hostName, Iface: "host0", Addr: "198.18.90.1/24"})
		answers(fmt.Sprintf("after the link was made again (%d)", round+1))
	}
}
