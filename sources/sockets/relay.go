package sockets

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
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
	// DefaultRelayInterface is the tunnel's interface in the guest
	// (host-switch's tap), to which the relay's sockets on the relay
	// address are bound.
	DefaultRelayInterface = "eth0"
	// DefaultRelayIdle ends a relayed TCP connection with no traffic
	// either way for that long.
	DefaultRelayIdle = 2 * time.Minute
	// DefaultRelayUDPIdle ends a UDP session with no datagram either way
	// for that long.
	DefaultRelayUDPIdle = 60 * time.Second
	// DefaultRelayMaxConns is how many TCP connections, or UDP sessions,
	// one relay carries at once.
	DefaultRelayMaxConns = 256
	// DefaultRelayMaxTotal is how many TCP connections and UDP sessions
	// every relay together carries at once (each holds two descriptors).
	DefaultRelayMaxTotal = 1024
	// DefaultRelayMaxPerClient is how many TCP connections, or UDP
	// sessions, one relay carries at once for one client address.
	DefaultRelayMaxPerClient = 32
)

const (
	relayBufSize     = 32 << 10 // per direction of a TCP connection
	relayDialTimeout = 5 * time.Second
)

// relayEntry is where relays listen: an address of the namespace and,
// when set, the interface their sockets are bound to (SO_BINDTODEVICE), so
// that only traffic coming in through it reaches them.
type relayEntry struct {
	addr  netip.Addr
	iface string
}

func (e relayEntry) String() string {
	if e.iface == "" {
		return e.addr.String()
	}
	return e.addr.String() + "%" + e.iface
}

// relayPort is a protocol and port a loopback-only socket has.
type relayPort struct {
	proto core.Protocol
	port  uint16
}

// relayKey is what one relay listens for: a protocol and port on one
// entry (an index into relays.entries).
type relayKey struct {
	at int
	relayPort
}

// relays makes reported loopback-only sockets reachable on each relay
// entry, one relay per entry, protocol and port. Its methods are called
// from Run's goroutine only; each relay runs its own goroutines, which
// close waits for.
type relays struct {
	entries       []relayEntry
	idle, udpIdle time.Duration
	maxConns      int
	maxPerClient  int
	total         chan struct{} // a slot per connection or session, of every relay
	load          relayLoad
	changed       chan struct{} // a value when the load's refusals or errors grew
	log           *zap.Logger
	ns            *netnsThread // nil: the agent's own namespace
	active        map[relayKey]*relay
	byID          map[string]core.Port   // the relayed ids and their sockets
	owners        map[relayPort][]string // ids behind a port, in order of arrival
	wg            sync.WaitGroup
	missingLogged map[int]bool // entries whose address or interface was missing, logged once
	bound         []int        // by entry: the index of its interface when its relays were opened
	nsError       bool
}

// relay is one running relay.
type relay struct {
	owner  string // the id whose socket it forwards to
	stop   context.CancelFunc
	closer func() // closes the relay's listening socket
	done   chan struct{}
}

// newRelays returns the relays of one Run, or nil without entries. The
// relay sockets are made in the namespace at cfg.Netns.
func newRelays(cfg Config, entries []relayEntry, log *zap.Logger) *relays {
	if len(entries) == 0 {
		return nil
	}
	at := make([]string, len(entries))
	for i, e := range entries {
		at[i] = e.String()
	}
	r := &relays{
		entries: entries, idle: cfg.RelayIdle, udpIdle: cfg.RelayUDPIdle, maxConns: cfg.RelayMaxConns,
		maxPerClient: cfg.RelayMaxPerClient, total: make(chan struct{}, cfg.RelayMaxTotal), changed: make(chan struct{}, 1),
		log: log.With(zap.Strings("relay_at", at)), active: map[relayKey]*relay{},
		byID: map[string]core.Port{}, owners: map[relayPort][]string{}, missingLogged: map[int]bool{},
	}
	if cfg.Netns != "" {
		ns, err := startNetnsThread(cfg.Netns)
		if err != nil {
			r.log.Warn("cannot enter the network namespace; loopback-only sockets are not relayed", zap.Error(err))
			return nil
		}
		r.ns = ns
	}
	r.bound = make([]int, len(entries))
	for i, e := range entries {
		r.bound[i] = r.ifindex(e)
	}
	r.log.Info("relaying loopback-only sockets from the relay addresses",
		zap.Duration("idle", r.idle), zap.Duration("udp_idle", r.udpIdle), zap.Int("max_conns", r.maxConns),
		zap.Int("max_total", cap(r.total)), zap.Int("max_per_client", r.maxPerClient))
	return r
}

// relayLoad counts what the relays carry and what they turned away.
type relayLoad struct {
	refused      atomic.Int64 // connections reset, datagrams of new sessions dropped, at a limit
	acceptErrors atomic.Int64 // failed accepts (out of descriptors, say), each followed by a pause
	saturated    atomic.Bool  // the last new connection or session met a limit
}

// RelayLoad is what the relays of a source carry and turned away.
type RelayLoad struct {
	// Active is how many TCP connections and UDP sessions they carry now,
	// of at most Max.
	Active, Max int
	// Refused counts connections and sessions turned away at a limit (of
	// the relay, of one client, or of all); AcceptErrors failed accepts.
	Refused, AcceptErrors int64
	// Saturated is true when the last connection or session to be turned
	// away came after the last one taken.
	Saturated bool
}

// String is the load as the source's status line shows it.
func (l RelayLoad) String() string {
	s := fmt.Sprintf("relays carry %d of %d connections and sessions", l.Active, l.Max)
	if l.Refused > 0 {
		s += fmt.Sprintf(", %d refused at a limit", l.Refused)
	}
	if l.AcceptErrors > 0 {
		s += fmt.Sprintf(", %d failed accepts", l.AcceptErrors)
	}
	if l.Saturated {
		s += " (saturated)"
	}
	return s
}

// loadNow returns the relays' load.
func (r *relays) loadNow() RelayLoad {
	if r == nil {
		return RelayLoad{}
	}
	return RelayLoad{Active: len(r.total), Max: cap(r.total), Refused: r.load.refused.Load(),
		AcceptErrors: r.load.acceptErrors.Load(), Saturated: r.load.saturated.Load()}
}

// admit takes a slot of all for a new connection or session of client,
// which already holds n of this relay's: false, counted as refused, when
// one client or all are at their limit.
func (r *relays) admit(n int) bool {
	if n >= r.maxPerClient {
		r.refuse()
		return false
	}
	select {
	case r.total <- struct{}{}:
		r.load.saturated.Store(false)
		return true
	default:
		r.refuse()
		return false
	}
}

// release gives back a slot admit took.
func (r *relays) release() { <-r.total }

func (r *relays) refuse() {
	r.load.refused.Add(1)
	r.load.saturated.Store(true)
	r.signal()
}

// signal says the load changed in a way the status shows.
func (r *relays) signal() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// loadChanged is the channel of signal; nil without relays.
func (r *relays) loadChanged() <-chan struct{} {
	if r == nil {
		return nil
	}
	return r.changed
}

// add relays the reported id, when its socket is on a loopback address.
func (r *relays) add(id string, p core.Port) {
	if r == nil || !p.HostIP.IsLoopback() || (p.Protocol != core.TCP && p.Protocol != core.UDP) {
		return
	}
	pk := relayPort{p.Protocol, p.HostPort}
	r.byID[id] = p
	r.owners[pk] = append(r.owners[pk], id)
	if len(r.owners[pk]) > 1 {
		return
	}
	for i := range r.entries {
		if k := (relayKey{i, pk}); r.active[k] == nil {
			r.start(k, id, netip.AddrPortFrom(p.HostIP, p.HostPort))
		}
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
	pk := relayPort{p.Protocol, p.HostPort}
	delete(r.byID, id)
	r.owners[pk] = slices.DeleteFunc(r.owners[pk], func(o string) bool { return o == id })
	var halted []relayKey
	for i := range r.entries {
		k := relayKey{i, pk}
		if rl := r.active[k]; rl != nil && rl.owner == id {
			r.halt(k, rl)
			halted = append(halted, k)
		}
	}
	if len(r.owners[pk]) == 0 {
		delete(r.owners, pk)
		return
	}
	next := r.owners[pk][0]
	np := r.byID[next]
	for _, k := range halted {
		r.start(k, next, netip.AddrPortFrom(np.HostIP, np.HostPort))
	}
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
// cannot be opened is logged and skipped: the entry's address may not be
// assigned in the namespace or its interface missing, or another process
// may hold the port on it (one listening on 0.0.0.0, which is then
// reachable there anyway).
func (r *relays) start(k relayKey, id string, backend netip.AddrPort) {
	if r.nsError {
		return
	}
	entry := r.entries[k.at]
	at := netip.AddrPortFrom(entry.addr, k.port)
	lc := net.ListenConfig{Control: bindToDevice(entry.iface)}
	var (
		ln  net.Listener
		pc  net.PacketConn
		err error
	)
	if doErr := r.ns.do(func() {
		if k.proto == core.TCP {
			ln, err = lc.Listen(context.Background(), "tcp", at.String())
		} else {
			pc, err = lc.ListenPacket(context.Background(), "udp", at.String())
		}
	}); doErr != nil {
		err = doErr
	}
	log := r.log.With(zap.String("id", id), zap.Stringer("at", entry))
	switch {
	case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.ENODEV):
		if !r.missingLogged[k.at] {
			log.Warn("the relay address is not assigned in the namespace, or its interface is missing; loopback-only sockets are not relayed there", zap.Error(err))
			r.missingLogged[k.at] = true
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
		udp := pc.(*net.UDPConn)
		rl.closer = func() { _ = udp.Close() }
		go func() { defer r.wg.Done(); defer close(rl.done); r.serveUDP(ctx, udp, backend, log) }()
	}
	log.Debug("relay started", zap.Stringer("listen", at), zap.Stringer("backend", backend))
}

// bindToDevice returns a socket Control that binds the socket to iface
// (SO_BINDTODEVICE), or nil for none.
func bindToDevice(iface string) func(network, address string, c syscall.RawConn) error {
	if iface == "" {
		return nil
	}
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptString(int(fd), syscall.SOL_SOCKET, syscall.SO_BINDTODEVICE, iface)
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("binding to %s: %w", iface, serr)
		}
		return nil
	}
}

// dial connects to the backend from inside the namespace.
func (r *relays) dial(network string, backend netip.AddrPort) (c net.Conn, err error) {
	d := net.Dialer{Timeout: relayDialTimeout}
	if doErr := r.ns.do(func() { c, err = d.Dial(network, backend.String()) }); doErr != nil {
		return nil, doErr
	}
	return c, err
}
