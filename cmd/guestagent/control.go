package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// DefaultControlSocket is where the agent serves its state to the status,
// watch and explain commands.
const DefaultControlSocket = "/run/guestagent/guestagent.sock"

// listenControl opens the control socket at path, mode 0600, so that only
// root and the agent's own user reach it. It creates the socket's
// directory (0700) when it is missing and changes nothing it did not
// create: an existing directory keeps its mode, and anything at path but a
// stale socket (one nobody answers on) is an error, a symbolic link
// included. A socket another running agent answers on is an error too.
//
// The socket is bound in a directory of its own (0700, beside path),
// made 0600 there and then linked to path, which fails if anything
// appeared at path in between: no one can connect while the mode is the
// umask's, and no process-wide umask is changed.
func listenControl(path string, log *zap.Logger) (net.Listener, error) {
	dir := filepath.Dir(path)
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("--controlSocket: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("--controlSocket: %w", err)
	case !fi.IsDir():
		return nil, fmt.Errorf("--controlSocket %s: %s is not a directory", path, dir)
	default:
		warnSharedDir(dir, fi, log)
	}
	if err := clearStaleSocket(path); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(dir, ".ga")
	if err != nil {
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	defer os.Remove(tmp)
	bound := filepath.Join(tmp, "s")
	ln, err := net.Listen("unix", bound)
	if err != nil {
		return nil, fmt.Errorf("--controlSocket %s: %w", path, err)
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // the temporary name goes below; path goes in Close
	defer os.Remove(bound)
	if err := os.Chmod(bound, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	if err := os.Link(bound, path); err != nil {
		ln.Close()
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("--controlSocket %s: something appeared at the path while the agent was starting; not replacing it", path)
		}
		return nil, fmt.Errorf("--controlSocket %s: %w", path, err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	return &controlListener{UnixListener: ul, path: path, fi: fi}, nil
}

// clearStaleSocket makes way for the control socket at path: nothing
// there is fine, a socket nobody answers on is removed, anything else is
// an error and left alone.
func clearStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("--controlSocket: %w", err)
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("--controlSocket %s is a symbolic link; the agent neither follows nor replaces it", path)
	case fi.Mode()&fs.ModeSocket == 0:
		return fmt.Errorf("--controlSocket %s exists and is not a socket (%s); the agent does not remove it", path, fi.Mode().Type())
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("--controlSocket %s: another agent is running and answers on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("--controlSocket: removing the stale socket: %w", err)
	}
	return nil
}

// warnSharedDir logs when others than root and the agent's user may
// write to dir (without the sticky bit, or as its owner): they could
// replace the socket with their own, which clients would then talk to.
func warnSharedDir(dir string, fi fs.FileInfo, log *zap.Logger) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return
	}
	uid := uint32(os.Getuid())
	switch {
	case st.Uid != 0 && st.Uid != uid:
		log.Warn("the control socket's directory belongs to another user, who can replace the socket", zap.String("dir", dir), zap.Uint32("owner", st.Uid))
	case fi.Mode()&0o022 != 0 && fi.Mode()&fs.ModeSticky == 0:
		log.Warn("others may write to the control socket's directory and replace the socket", zap.String("dir", dir), zap.Stringer("mode", fi.Mode()))
	}
}

// controlListener is the control socket: it reports path as its address
// and removes path when closed, if path is still the socket it bound.
type controlListener struct {
	*net.UnixListener
	path   string
	fi     fs.FileInfo
	remove sync.Once
}

func (l *controlListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *controlListener) Close() error {
	err := l.UnixListener.Close()
	l.remove.Do(func() {
		if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.fi) {
			_ = os.Remove(l.path)
		}
	})
	return err
}

// Bounds of the status endpoint and of the control socket, each: a local
// user may open connections and leave them idle, or read slowly, and the
// agent's descriptors must not run out.
const (
	// maxConns is how many connections one server holds open; more wait
	// in the kernel's backlog until one closes.
	maxConns = 64
	// maxWatches is how many /watch streams one server holds open, so
	// that streams always leave room for other requests.
	maxWatches = maxConns / 2
	// readHeaderTimeout bounds how long a new or idle connection takes
	// to send a request's header; readTimeout the whole request.
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	// writeTimeout bounds writing a response (a /watch stream: each of
	// its writes; a profile: its duration more).
	writeTimeout = 10 * time.Second
	// idleTimeout closes a keep-alive connection that sends no request.
	idleTimeout = 10 * time.Second
)

// serveHTTP serves h on ln until ctx is done, within the bounds above.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler, log *zap.Logger, what string) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          zap.NewStdLog(log.With(zap.String("server", what))),
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = srv.Close() // streams (watch) do not end by themselves
	})
	defer stop()
	log.Info("serving "+what, zap.String("addr", ln.Addr().String()), zap.Int("max_connections", maxConns))
	if err := srv.Serve(limitListener(ln, maxConns, log.With(zap.String("server", what)))); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error(what+" server stopped", zap.Error(err))
	}
}

// limitListener returns ln accepting at most n connections at a time:
// while n are open, Accept waits for one to close. Reaching the limit is
// logged, once a minute at most.
func limitListener(ln net.Listener, n int, log *zap.Logger) net.Listener {
	return &limitedListener{Listener: ln, slots: make(chan struct{}, n), closed: make(chan struct{}), log: log}
}

type limitedListener struct {
	net.Listener
	slots     chan struct{} // one element per open connection
	closed    chan struct{}
	closeOnce sync.Once
	log       *zap.Logger
	warned    time.Time // belongs to the goroutine calling Accept
}

func (l *limitedListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	default:
		if now := time.Now(); now.Sub(l.warned) > time.Minute {
			l.warned = now
			l.log.Warn("connection limit reached; new connections wait until one closes", zap.Int("limit", cap(l.slots)))
		}
		select {
		case l.slots <- struct{}{}:
		case <-l.closed:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.slots }}, nil
}

func (l *limitedListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// limitedConn gives its listener's slot back when closed.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// watchEvent is one line of the watch stream.
type watchEvent struct {
	Time  time.Time `json:"time"`
	Event string    `json:"event"`
	// The host address, spelt as in the status's ports: "protocol",
	// "hostIP" and "hostPort"; none for the events of a sink alone.
	*PortAddr
	Sink  string `json:"sink,omitempty"`
	State string `json:"state,omitempty"`
	// Claims are the port's claims, each as in the status's ports.
	Claims []core.ClaimStatus `json:"claims,omitempty"`
	Error  string             `json:"error,omitempty"`
}

// PortAddr is a claimed host address, with the JSON fields of a port of
// the status (core.PortStatus), so that a port reads the same in both.
type PortAddr struct {
	Protocol core.Protocol `json:"protocol"`
	HostIP   netip.Addr    `json:"hostIP"`
	HostPort uint16        `json:"hostPort"`
}

// String renders p as "tcp 127.0.0.1:8080".
func (p PortAddr) String() string {
	return fmt.Sprintf("%s %s", p.Protocol, addrPort(p.HostIP, p.HostPort))
}

// port names the event's host address ("tcp 127.0.0.1:8080"); it is
// empty for the events of a sink alone.
func (ev watchEvent) port() string {
	if ev.PortAddr == nil {
		return ""
	}
	return ev.PortAddr.String()
}

// Events of the watch stream.
const (
	evCurrent      = "current"      // the state when the stream starts
	evAdded        = "added"        // a sink took a port
	evRemoved      = "removed"      // a port went from a sink
	evFailed       = "failed"       // a sink's peer refused a port
	evRecovered    = "recovered"    // a port a peer refused was taken
	evRefused      = "refused"      // the networking mode or validation left a port out
	evConflict     = "conflict"     // another party holds the port with another target
	evElsewhere    = "held-by-peer" // another party holds the port with the same target
	evUnsupported  = "unsupported"  // a sink cannot take the port
	evPeerDown     = "peer-down"    // a sink's peer is unreachable
	evPeerUp       = "peer-up"      // and reachable again
	evDisconnected = "disconnected" // (client side) the agent went away
	evReconnected  = "reconnected"  // (client side) the agent is back
)

// addrPort renders ip:port, with a missing address as 0.0.0.0.
func addrPort(ip netip.Addr, port uint16) string {
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return netip.AddrPortFrom(ip, port).String()
}

func portOf(ps core.PortStatus) PortAddr {
	return PortAddr{Protocol: ps.Protocol, HostIP: ps.HostIP, HostPort: ps.HostPort}
}

func refusedPort(f core.Refusal) *PortAddr {
	return &PortAddr{Protocol: f.Port.Protocol, HostIP: f.Port.HostIP, HostPort: f.Port.HostPort}
}

// claimsOf are the claims of ps for a watch event: a copy, as the status
// is shared among readers.
func claimsOf(ps core.PortStatus) []core.ClaimStatus { return slices.Clone(ps.Claims) }

// currentEvents describes st as the first lines of a watch stream.
func currentEvents(st core.Status, now time.Time) []watchEvent {
	var out []watchEvent
	for _, ps := range st.Ports {
		p := portOf(ps)
		for _, at := range ps.Sinks {
			out = append(out, watchEvent{Time: now, Event: evCurrent, PortAddr: &p, Sink: at.Sink, State: at.State, Claims: claimsOf(ps), Error: at.Error})
		}
	}
	for _, f := range st.Refused {
		out = append(out, watchEvent{Time: now, Event: evCurrent, PortAddr: refusedPort(f), State: evRefused, Claims: []core.ClaimStatus{{Key: f.Key, ContainerPort: f.Port.ContainerPort}}, Error: f.Reason})
	}
	for _, s := range st.Sinks {
		if s.PeerDown {
			out = append(out, watchEvent{Time: now, Event: evCurrent, Sink: s.Name, State: evPeerDown, Error: s.LastError})
		}
	}
	return out
}

type portAt struct {
	port PortAddr
	sink string
}

// diffEvents returns the changes from old to cur, in a stable order.
func diffEvents(old, cur core.Status, now time.Time) []watchEvent {
	before := map[portAt]core.PortAtSink{}
	for _, ps := range old.Ports {
		for _, at := range ps.Sinks {
			before[portAt{portOf(ps), at.Sink}] = at
		}
	}
	var out []watchEvent
	seen := map[portAt]bool{}
	for _, ps := range cur.Ports {
		for _, at := range ps.Sinks {
			k := portAt{portOf(ps), at.Sink}
			seen[k] = true
			prev, had := before[k]
			if had && prev.State == at.State && prev.Error == at.Error {
				continue
			}
			ev := ""
			switch at.State {
			case core.PortExposed:
				ev = evAdded
				if had && (prev.State == core.PortRetrying || prev.State == core.PortRejected || prev.State == core.PortConflict) {
					ev = evRecovered
				} else if had && prev.State == core.PortExposed {
					continue
				}
			case core.PortRetrying, core.PortRejected:
				if had && prev.State == at.State {
					continue // the same failure with a new message
				}
				ev = evFailed
			case core.PortConflict:
				ev = evConflict
			case core.PortElsewhere:
				ev = evElsewhere
			case core.PortUnsupported:
				ev = evUnsupported
			case core.PortPending:
				if had && prev.State == core.PortExposed {
					ev = evRemoved // on its way out, or being replaced
					break
				}
				continue
			default:
				continue
			}
			out = append(out, watchEvent{Time: now, Event: ev, PortAddr: &k.port, Sink: k.sink, State: at.State, Claims: claimsOf(ps), Error: at.Error})
		}
	}
	for _, k := range slices.SortedFunc(maps.Keys(before), func(a, b portAt) int {
		return cmp.Or(strings.Compare(a.port.String(), b.port.String()), strings.Compare(a.sink, b.sink))
	}) {
		if !seen[k] && before[k].State == core.PortExposed {
			out = append(out, watchEvent{Time: now, Event: evRemoved, PortAddr: &k.port, Sink: k.sink})
		}
	}
	was := map[string]bool{}
	for _, f := range old.Refused {
		was[f.Key.String()+" "+f.Port.String()] = true
	}
	for _, f := range cur.Refused {
		if !was[f.Key.String()+" "+f.Port.String()] {
			out = append(out, watchEvent{Time: now, Event: evRefused, PortAddr: refusedPort(f), Claims: []core.ClaimStatus{{Key: f.Key, ContainerPort: f.Port.ContainerPort}}, Error: f.Reason})
		}
	}
	down := map[string]bool{}
	for _, s := range old.Sinks {
		down[s.Name] = s.PeerDown
	}
	for _, s := range cur.Sinks {
		switch {
		case s.PeerDown && !down[s.Name]:
			out = append(out, watchEvent{Time: now, Event: evPeerDown, Sink: s.Name, Error: s.LastError})
		case !s.PeerDown && down[s.Name]:
			out = append(out, watchEvent{Time: now, Event: evPeerUp, Sink: s.Name})
		}
	}
	return out
}

// watchHandler streams the router's changes as NDJSON, starting with its
// current state, until the client goes or the agent stops. It serves at
// most limit streams at a time and refuses more with 503. The server's
// write timeout bounds each write of a stream, not the stream.
func watchHandler(snap *snapshots, limit int, log *zap.Logger) http.HandlerFunc {
	streams := make(chan struct{}, limit)
	var refused sync.Once
	return func(w http.ResponseWriter, req *http.Request) {
		select {
		case streams <- struct{}{}:
			defer func() { <-streams }()
		default:
			refused.Do(func() {
				log.Warn("refusing /watch streams beyond the limit; each server holds that many at a time", zap.Int("limit", limit))
			})
			http.Error(w, fmt.Sprintf("too many /watch streams on this endpoint (%d at a time); try again later", limit), http.StatusServiceUnavailable)
			return
		}
		rc := http.NewResponseController(w)
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		// send writes one batch of events within the write timeout.
		send := func(evs []watchEvent) bool {
			_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
			for _, ev := range evs {
				if enc.Encode(ev) != nil {
					return false
				}
			}
			return rc.Flush() == nil
		}
		changed := snap.r.Changed()
		st := snap.since(time.Now())
		if !send(currentEvents(st, time.Now())) {
			return
		}
		for {
			select {
			case <-req.Context().Done():
				return
			case <-changed:
			}
			// Let a burst settle into one diff.
			select {
			case <-req.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
			changed = snap.r.Changed()
			cur := snap.since(time.Now())
			if !send(diffEvents(st, cur, time.Now())) {
				return
			}
			st = cur
		}
	}
}
