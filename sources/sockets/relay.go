package sockets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
)

// Defaults of the relay's Config fields.
const (
	// DefaultRelayAddr is the guest's address on host-switch's network,
	// where its traffic arrives in network-tunnel mode.
	DefaultRelayAddr = "192.168.127.2"
	// DefaultRelayIdle ends a relayed TCP connection with no traffic
	// either way for that long.
	DefaultRelayIdle = 2 * time.Minute
	// DefaultRelayUDPIdle ends a UDP session with no datagram either way
	// for that long.
	DefaultRelayUDPIdle = 60 * time.Second
	// DefaultRelayMaxConns is how many TCP connections, or UDP sessions,
	// one relay carries at once.
	DefaultRelayMaxConns = 256
)

const (
	relayBufSize     = 32 << 10 // per direction of a TCP connection
	relayDialTimeout = 5 * time.Second
)

// relayKey is what one relay listens for: a protocol and port on the
// relay address.
type relayKey struct {
	proto core.Protocol
	port  uint16
}

// relays makes reported loopback-only sockets reachable on the relay
// address, one relay per protocol and port. Its methods are called from
// Run's goroutine only; each relay runs its own goroutines, which close
// waits for.
type relays struct {
	addr                  netip.Addr
	idle, udpIdle         time.Duration
	maxConns              int
	log                   *zap.Logger
	ns                    *netnsThread // nil: the agent's own namespace
	active                map[relayKey]*relay
	byID                  map[string]core.Port  // the relayed ids and their sockets
	owners                map[relayKey][]string // ids behind a key, in order of arrival
	wg                    sync.WaitGroup
	noAddrLogged, nsError bool
}

// relay is one running relay.
type relay struct {
	owner  string // the id whose socket it forwards to
	stop   context.CancelFunc
	closer func() // closes the relay's listening socket
	done   chan struct{}
}

// newRelays returns the relays of one Run, or nil when cfg has no relay
// address. The relay sockets are made in the namespace at netns.
func newRelays(cfg Config, addr netip.Addr, log *zap.Logger) *relays {
	if !addr.IsValid() {
		return nil
	}
	r := &relays{
		addr: addr, idle: cfg.RelayIdle, udpIdle: cfg.RelayUDPIdle, maxConns: cfg.RelayMaxConns,
		log: log.With(zap.Stringer("relay_addr", addr)), active: map[relayKey]*relay{},
		byID: map[string]core.Port{}, owners: map[relayKey][]string{},
	}
	if cfg.Netns != "" {
		ns, err := startNetnsThread(cfg.Netns)
		if err != nil {
			r.log.Warn("cannot enter the network namespace; loopback-only sockets are not relayed", zap.Error(err))
			return nil
		}
		r.ns = ns
	}
	r.log.Info("relaying loopback-only sockets from the relay address",
		zap.Duration("idle", r.idle), zap.Duration("udp_idle", r.udpIdle), zap.Int("max_conns", r.maxConns))
	return r
}

// add relays the reported id, when its socket is on a loopback address.
func (r *relays) add(id string, p core.Port) {
	if r == nil || !p.HostIP.IsLoopback() || (p.Protocol != core.TCP && p.Protocol != core.UDP) {
		return
	}
	k := relayKey{p.Protocol, p.HostPort}
	r.byID[id] = p
	r.owners[k] = append(r.owners[k], id)
	if _, ok := r.active[k]; !ok && len(r.owners[k]) == 1 {
		r.start(k, id, netip.AddrPortFrom(p.HostIP, p.HostPort))
	}
}

// remove stops relaying id; a relay whose socket goes while another
// loopback socket has the same port (127.0.0.1 and ::1) moves to that one.
func (r *relays) remove(id string) {
	if r == nil {
		return
	}
	p, ok := r.byID[id]
	if !ok {
		return
	}
	k := relayKey{p.Protocol, p.HostPort}
	delete(r.byID, id)
	r.owners[k] = slices.DeleteFunc(r.owners[k], func(o string) bool { return o == id })
	rl := r.active[k]
	if rl != nil && rl.owner != id {
		return
	}
	if rl != nil {
		r.halt(k, rl)
	}
	if len(r.owners[k]) == 0 {
		delete(r.owners, k)
		return
	}
	next := r.owners[k][0]
	np := r.byID[next]
	r.start(k, next, netip.AddrPortFrom(np.HostIP, np.HostPort))
}

// close stops every relay and waits for all their goroutines.
func (r *relays) close() {
	if r == nil {
		return
	}
	for k, rl := range r.active {
		r.halt(k, rl)
	}
	r.wg.Wait()
	r.ns.close()
}

func (r *relays) halt(k relayKey, rl *relay) {
	rl.stop()
	rl.closer()
	<-rl.done
	delete(r.active, k)
	r.log.Debug("relay stopped", zap.String("id", rl.owner))
}

// start opens the relay socket for k, forwarding to backend. A socket that
// cannot be opened is logged and skipped: the relay address may not be
// assigned in the namespace, or another process may hold the port on it
// (one listening on 0.0.0.0, which is then reachable there anyway).
func (r *relays) start(k relayKey, id string, backend netip.AddrPort) {
	if r.nsError {
		return
	}
	at := netip.AddrPortFrom(r.addr, k.port)
	var (
		ln  net.Listener
		pc  *net.UDPConn
		err error
	)
	if doErr := r.ns.do(func() {
		if k.proto == core.TCP {
			ln, err = net.Listen("tcp", at.String())
		} else {
			pc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(at))
		}
	}); doErr != nil {
		err = doErr
	}
	log := r.log.With(zap.String("id", id))
	switch {
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		if !r.noAddrLogged {
			log.Warn("the relay address is not assigned in the namespace; loopback-only sockets are not relayed", zap.Error(err))
			r.noAddrLogged = true
		}
		return
	case errors.Is(err, syscall.EADDRINUSE):
		log.Info("the port is taken on the relay address; not relayed", zap.Error(err))
		return
	case errors.Is(err, errNetnsClosed):
		r.nsError = true
		return
	case err != nil:
		log.Warn("cannot open a relay socket; not relayed", zap.Error(err))
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	rl := &relay{owner: id, stop: cancel, done: make(chan struct{})}
	r.active[k] = rl
	r.wg.Add(1)
	if ln != nil {
		rl.closer = func() { _ = ln.Close() }
		go func() { defer r.wg.Done(); defer close(rl.done); r.serveTCP(ctx, ln, backend, log) }()
	} else {
		rl.closer = func() { _ = pc.Close() }
		go func() { defer r.wg.Done(); defer close(rl.done); r.serveUDP(ctx, pc, backend, log) }()
	}
	log.Debug("relay started", zap.Stringer("listen", at), zap.Stringer("backend", backend))
}

// dial connects to the backend from inside the namespace.
func (r *relays) dial(network string, backend netip.AddrPort) (c net.Conn, err error) {
	d := net.Dialer{Timeout: relayDialTimeout}
	if doErr := r.ns.do(func() { c, err = d.Dial(network, backend.String()) }); doErr != nil {
		return nil, doErr
	}
	return c, err
}

// serveTCP accepts connections on ln until it is closed, and forwards each
// to backend, at most maxConns at once.
func (r *relays) serveTCP(ctx context.Context, ln net.Listener, backend netip.AddrPort, log *zap.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, r.maxConns)
	full := false
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Warn("relay stopped accepting", zap.Error(err))
			}
			return
		}
		select {
		case slots <- struct{}{}:
			full = false
		default:
			if !full {
				log.Warn("relay at its connection limit; refusing connections", zap.Int("max_conns", r.maxConns))
				full = true
			}
			reset(c)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			b, err := r.dial("tcp", backend)
			if err != nil {
				log.Debug("cannot reach the relayed socket", zap.Error(err))
				reset(c)
				return
			}
			proxyTCP(ctx, c.(*net.TCPConn), b.(*net.TCPConn), r.idle)
		}()
	}
}

// reset closes c with a reset, as a refused connection is answered.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// proxyTCP copies between a and b until both directions end, passing each
// end of stream on as a half-close. It gives up when ctx is done, when
// either side fails, or when neither side has sent anything for idle.
func proxyTCP(ctx context.Context, a, b *net.TCPConn, idle time.Duration) {
	closeBoth := func() { _ = a.Close(); _ = b.Close() }
	defer context.AfterFunc(ctx, closeBoth)()
	defer closeBoth()
	act := &activity{idle: idle}
	act.touch()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if !pipe(b, a, act) {
			closeBoth()
		}
	}()
	if !pipe(a, b, act) {
		closeBoth()
	}
	<-done
}

// pipe copies src to dst through a fixed-size buffer and half-closes dst
// at the end of src. It reports whether src ended cleanly.
func pipe(dst, src *net.TCPConn, act *activity) bool {
	buf := make([]byte, relayBufSize)
	// The wrappers hide ReadFrom and WriteTo, so that the copy goes
	// through buf and the deadlines apply.
	_, err := io.CopyBuffer(idleWriter{dst, act}, idleReader{src, act}, buf)
	if err != nil {
		return false
	}
	return dst.CloseWrite() == nil
}

// activity is when a connection last carried data, shared by its two
// directions: a direction waiting for data while the other one is busy is
// not idle.
type activity struct {
	idle time.Duration
	last atomic.Int64 // unix nanoseconds
}

func (a *activity) touch() { a.last.Store(time.Now().UnixNano()) }

// deadline is when the connection counts as idle.
func (a *activity) deadline() time.Time { return time.Unix(0, a.last.Load()).Add(a.idle) }

type idleReader struct {
	c   *net.TCPConn
	act *activity
}

// Read reads with the connection's idle deadline, waiting on while the
// other direction keeps the connection busy.
func (r idleReader) Read(p []byte) (int, error) {
	for {
		_ = r.c.SetReadDeadline(r.act.deadline())
		n, err := r.c.Read(p)
		if n > 0 {
			r.act.touch()
		}
		if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(r.act.deadline()) {
			continue
		}
		return n, err
	}
}

type idleWriter struct {
	c   *net.TCPConn
	act *activity
}

// Write writes with a deadline of the idle time from now: a peer that
// stops reading holds the connection no longer than an idle one.
func (w idleWriter) Write(p []byte) (int, error) {
	_ = w.c.SetWriteDeadline(time.Now().Add(w.act.idle))
	n, err := w.c.Write(p)
	if n > 0 {
		w.act.touch()
	}
	return n, err
}

// udpSession is one client of a UDP relay, with its own connected socket
// to the backend.
type udpSession struct {
	conn *net.UDPConn
	last atomic.Int64 // unix nanoseconds of the last datagram either way
}

// serveUDP reads datagrams on pc until it is closed and forwards each to
// backend over its client's session, opening one per client address (at
// most maxConns at once); replies go back to the client from pc.
func (r *relays) serveUDP(ctx context.Context, pc *net.UDPConn, backend netip.AddrPort, log *zap.Logger) {
	var (
		mu       sync.Mutex
		sessions = map[netip.AddrPort]*udpSession{}
		wg       sync.WaitGroup
	)
	defer func() {
		mu.Lock()
		for _, s := range sessions {
			_ = s.conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	full := false
	buf := make([]byte, 64<<10)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			continue // an ICMP error for an earlier reply
		}
		mu.Lock()
		s := sessions[from]
		count := len(sessions)
		mu.Unlock()
		if s == nil {
			if count >= r.maxConns {
				if !full {
					log.Warn("relay at its session limit; dropping datagrams of new clients", zap.Int("max_sessions", r.maxConns))
					full = true
				}
				continue
			}
			full = false
			c, err := r.dial("udp", backend)
			if err != nil {
				log.Debug("cannot open a socket to the relayed socket", zap.Error(err))
				continue
			}
			s = &udpSession{conn: c.(*net.UDPConn)}
			s.last.Store(time.Now().UnixNano())
			mu.Lock()
			if ctx.Err() != nil {
				mu.Unlock()
				_ = s.conn.Close()
				return
			}
			sessions[from] = s
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.replies(pc, s, from)
				mu.Lock()
				if sessions[from] == s {
					delete(sessions, from)
				}
				mu.Unlock()
				_ = s.conn.Close()
			}()
		}
		s.last.Store(time.Now().UnixNano())
		_, _ = s.conn.Write(buf[:n])
	}
}

// replies sends what the backend answers on s back to client from pc,
// until the session has been idle for the idle time or its socket fails
// or is closed.
func (r *relays) replies(pc *net.UDPConn, s *udpSession, client netip.AddrPort) {
	buf := make([]byte, 64<<10)
	for {
		_ = s.conn.SetReadDeadline(time.Unix(0, s.last.Load()).Add(r.udpIdle))
		n, err := s.conn.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(time.Unix(0, s.last.Load()).Add(r.udpIdle)) {
				continue
			}
			return
		}
		s.last.Store(time.Now().UnixNano())
		_, _ = pc.WriteToUDPAddrPort(buf[:n], client)
	}
}

// errNetnsClosed is returned by netnsThread.do after the thread is gone.
var errNetnsClosed = errors.New("the network namespace's thread has stopped")

// netnsThread is a goroutine locked to an OS thread that has entered a
// network namespace, where it runs the functions given to do: sockets
// made there stay in that namespace. The thread is never handed back to
// the runtime, so no other goroutine runs in the namespace; it ends with
// close. A nil *netnsThread runs functions on the caller's goroutine.
type netnsThread struct {
	work   chan func()
	done   chan struct{}
	mu     sync.Mutex // guards closed, and sends on work against close
	closed bool
}

func startNetnsThread(path string) (*netnsThread, error) {
	t := &netnsThread{work: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		defer close(t.done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		f, err := os.Open(path)
		if err != nil {
			ready <- fmt.Errorf("opening network namespace: %w", err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		_ = f.Close()
		if err != nil {
			ready <- fmt.Errorf("entering network namespace %s: %w", path, err)
			return
		}
		ready <- nil
		for fn := range t.work {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		<-t.done
		return nil, err
	}
	return t, nil
}

// do runs fn on the thread and waits for it.
func (t *netnsThread) do(fn func()) error {
	if t == nil {
		fn()
		return nil
	}
	finished := make(chan struct{})
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return errNetnsClosed
	}
	t.work <- func() { defer close(finished); fn() }
	t.mu.Unlock()
	<-finished
	return nil
}

// close ends the thread once the function it runs returns.
func (t *netnsThread) close() {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.closed = true
	close(t.work)
	t.mu.Unlock()
	<-t.done
}
