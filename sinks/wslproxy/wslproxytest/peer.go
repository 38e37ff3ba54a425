// Package wslproxytest is a wsl-proxy peer for tests. It speaks the
// documented protocol (one PortMapping JSON document per connection on a
// unix socket, no reply) and, like the real one, listens on each binding's
// HostIp:HostPort and forwards TCP connections upstream. Like the real one
// it handles each connection in a goroutine of its own and closes it once
// it has applied the message, so that messages on connections opened back
// to back may be applied in either order (Jitter makes that likely), and
// it keys listeners by protocol and port alone: a remove closes the port
// whatever address it names, and an add for a port it already listens on
// at another address fails (and is recorded as an error).
package wslproxytest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/wire"
)

// Peer is a running test peer.
type Peer struct {
	// Path is the unix socket.
	Path string
	// Upstream returns where a connection to host port p is forwarded.
	Upstream func(hostPort uint16) string
	// Netns, when set, names the network namespace (under /var/run/netns)
	// the peer listens and dials upstream in, as wsl-proxy does in WSL's
	// default namespace; the unix socket is a file, reached from anywhere.
	Netns string
	// RecordOnly keeps the state without binding the ports, for tests in
	// which another peer binds them on the same machine.
	RecordOnly bool
	// Jitter, when set, delays applying each message by a random time
	// up to it, as the scheduler may delay one connection's goroutine
	// behind another's.
	Jitter time.Duration

	mu        sync.Mutex
	ln        net.Listener
	listeners map[string]listener // by "proto port"
	received  []wire.PortMapping
	errs      []error
	truncated int
	wg        sync.WaitGroup
}

// Start listens on p.Path.
func (p *Peer) Start() error {
	_ = os.Remove(p.Path)
	ln, err := net.Listen("unix", p.Path)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.ln = ln
	p.listeners = map[string]listener{}
	p.mu.Unlock()
	p.wg.Go(func() { p.accept(ln) })
	return nil
}

// Stop closes the socket and every listener, losing all state, as a
// wsl-proxy that exits.
func (p *Peer) Stop() {
	p.mu.Lock()
	ln := p.ln
	p.ln = nil
	for _, l := range p.listeners {
		_ = l.Close()
	}
	p.listeners = nil
	p.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	p.wg.Wait()
	_ = os.Remove(p.Path)
}

func (p *Peer) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() { p.handle(c) })
	}
}

func (p *Peer) handle(c net.Conn) {
	defer c.Close()
	var pm wire.PortMapping
	if err := json.NewDecoder(io.LimitReader(c, 1<<20)).Decode(&pm); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			// The sender closed before the message ended: a sender
			// killed while it sent. Counted, not an error.
			p.mu.Lock()
			p.truncated++
			p.mu.Unlock()
			return
		}
		p.fail(fmt.Errorf("decoding message: %w", err))
		return
	}
	ports, err := wire.ParsePorts(pm.Ports)
	if err != nil {
		p.fail(err)
		return
	}
	if p.Jitter > 0 {
		time.Sleep(rand.N(p.Jitter))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.received = append(p.received, pm)
	if p.listeners == nil {
		return
	}
	for _, port := range ports {
		key := fmt.Sprintf("%s %d", port.Protocol, port.HostPort)
		if pm.Remove {
			if l, ok := p.listeners[key]; ok {
				_ = l.Close()
				delete(p.listeners, key)
			}
			continue
		}
		if l, ok := p.listeners[key]; ok {
			if l.entry != Entry(port) {
				p.errs = append(p.errs, fmt.Errorf("add of %s while listening on %s: port %d already in use", Entry(port), l.entry, port.HostPort))
			}
			continue
		}
		var c io.Closer = nopCloser{}
		if !p.RecordOnly {
			c, err = p.listen(port)
		}
		if err != nil {
			p.errs = append(p.errs, err)
			continue
		}
		p.listeners[key] = listener{entry: Entry(port), Closer: c}
	}
}

// listener is one open port: its binding and its socket.
type listener struct {
	entry string // "proto ip:port"
	io.Closer
}

type nopCloser struct{}

func (nopCloser) Close() error { return nil }

func (p *Peer) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.errs = append(p.errs, err)
}

// Entry renders a port as "proto ip:port", the peer's state entries.
func Entry(port core.Port) string {
	ip := port.HostIP
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return fmt.Sprintf("%s %s", port.Protocol, netip.AddrPortFrom(ip, port.HostPort))
}

func (p *Peer) listen(port core.Port) (io.Closer, error) {
	addr := netip.AddrPortFrom(port.HostIP, port.HostPort).String()
	if !port.HostIP.IsValid() {
		addr = fmt.Sprintf(":%d", port.HostPort)
	}
	switch port.Protocol {
	case core.UDP:
		pc, err := within(p.Netns, func() (net.PacketConn, error) { return net.ListenPacket("udp", addr) })
		if err != nil {
			return nil, err
		}
		p.wg.Go(func() { p.forwardUDP(pc, port.HostPort) })
		return pc, nil
	case core.TCP:
		ln, err := within(p.Netns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
		if err != nil {
			return nil, err
		}
		p.wg.Go(func() { p.forward(ln, port.HostPort) })
		return ln, nil
	default:
		return nil, fmt.Errorf("unsupported protocol %s", port.Protocol)
	}
}

func (p *Peer) forward(ln net.Listener, hostPort uint16) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() {
			defer c.Close()
			if p.Upstream == nil {
				return
			}
			up, err := within(p.Netns, func() (net.Conn, error) { return net.Dial("tcp", p.Upstream(hostPort)) })
			if err != nil {
				return
			}
			defer up.Close()
			done := make(chan struct{})
			go func() {
				_, _ = io.Copy(up, c)
				if cw, ok := up.(interface{ CloseWrite() error }); ok {
					_ = cw.CloseWrite()
				}
				close(done)
			}()
			_, _ = io.Copy(c, up)
			<-done
		})
	}
}

// forwardUDP sends each datagram that arrives on pc to the upstream, one
// way, as wsl-proxy does: nothing goes back to the sender.
func (p *Peer) forwardUDP(pc net.PacketConn, hostPort uint16) {
	var up net.Conn
	defer func() {
		if up != nil {
			_ = up.Close()
		}
	}()
	buf := make([]byte, 65535)
	for {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if p.Upstream == nil {
			continue
		}
		if up == nil {
			if up, err = within(p.Netns, func() (net.Conn, error) { return net.Dial("udp", p.Upstream(hostPort)) }); err != nil {
				up = nil
				continue
			}
		}
		_, _ = up.Write(buf[:n])
	}
}

// within calls open in the network namespace ns, or here when ns is
// empty.
func within[T any](ns string, open func() (T, error)) (T, error) {
	if ns == "" {
		return open()
	}
	return testenv.Within(ns, open)
}

// State returns the bindings the peer listens on.
func (p *Peer) State() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.listeners))
	for _, l := range p.listeners {
		out = append(out, l.entry)
	}
	slices.Sort(out)
	return out
}

// Received returns every message the peer decoded, in order.
func (p *Peer) Received() []wire.PortMapping {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.received)
}

// Truncated returns how many connections ended before their message did
// (none at all, or part of one): what a sender killed while it sends
// leaves. wsl-proxy logs and drops them; Err does not count them.
func (p *Peer) Truncated() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.truncated
}

// Err returns the errors the peer met (undecodable messages, ports it could
// not listen on), joined.
func (p *Peer) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(p.errs...)
}
