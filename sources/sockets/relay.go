package sockets

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

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
