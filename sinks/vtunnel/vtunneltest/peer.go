// Package vtunneltest is a vtunnel peer for tests. It speaks the protocol
// of the vtunnel peer and the privileged host service behind it: one
// connection per message carrying one PortMapping JSON document, and no
// reply; a connection that closes without a byte is the sink's check and
// changes nothing. Like the host service, which listens on the host's
// every address, it keys its state by protocol and port alone: a remove
// drops the port whatever address it names, and an add for a port it
// already holds at another address is an error.
//
// It is at least as strict as the real peer: a message that is not
// exactly one PortMapping document, whose ports do not parse, which names
// no port, or whose connectAddrs are not addresses is refused and
// recorded as an error, as is a message that does not arrive in whole
// before the connection's deadline. Tests fail on Err.
package vtunneltest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/wire"
)

// MaxMessage bounds what the peer reads of one connection.
const MaxMessage = 1 << 20

// Peer is a test peer; its zero value is ready to Start.
type Peer struct {
	mu       sync.Mutex
	ln       net.Listener
	held     map[string]string // "proto port" -> "proto ip:port"; nil while stopped
	received []wire.PortMapping
	checks   int
	errs     []error
	wg       sync.WaitGroup
}

// Start serves on ln until Stop, with no state.
func (p *Peer) Start(ln net.Listener) {
	p.mu.Lock()
	p.ln, p.held = ln, map[string]string{}
	p.mu.Unlock()
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.handle(c) // one at a time, in the order they come
		}
	})
}

// Stop closes the listener, waits for the connection in hand and loses
// all state, as a peer that exits.
func (p *Peer) Stop() {
	p.mu.Lock()
	ln := p.ln
	p.ln, p.held = nil, nil
	p.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	p.wg.Wait()
}

// Addr is the address the peer listens on while it runs.
func (p *Peer) Addr() net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil {
		return nil
	}
	return p.ln.Addr()
}

func (p *Peer) handle(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	data, err := io.ReadAll(io.LimitReader(c, MaxMessage+1))
	if err != nil {
		p.fail(fmt.Errorf("reading a message: %w (after %d bytes)", err, len(data)))
		return
	}
	if len(data) > MaxMessage {
		p.fail(fmt.Errorf("a message longer than %d bytes", MaxMessage))
		return
	}
	if len(bytes.TrimSpace(data)) == 0 {
		p.mu.Lock()
		p.checks++
		p.mu.Unlock()
		return
	}
	pm, ports, err := Parse(data)
	if err != nil {
		p.fail(err)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.received = append(p.received, pm)
	if p.held == nil {
		return
	}
	for _, port := range ports {
		key := fmt.Sprintf("%s %d", port.Protocol, port.HostPort)
		if pm.Remove {
			delete(p.held, key)
			continue
		}
		if at, ok := p.held[key]; ok && at != Entry(port) {
			p.errs = append(p.errs, fmt.Errorf("add of %s while holding %s: port %d already in use", Entry(port), at, port.HostPort))
			continue
		}
		p.held[key] = Entry(port)
	}
}

// Parse reads one message as the peer does: exactly one PortMapping JSON
// document (white space may follow), whose ports parse and are at least
// one, and whose connectAddrs are {"network":"ip+net","addr":"IP/LEN"}
// or a tcp or udp "IP:PORT".
func Parse(data []byte) (wire.PortMapping, []core.Port, error) {
	var pm wire.PortMapping
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&pm); err != nil {
		return pm, nil, fmt.Errorf("decoding message %q: %w", data, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return pm, nil, fmt.Errorf("message %q: more than one JSON document", data)
	}
	ports, err := wire.ParsePorts(pm.Ports)
	if err != nil {
		return pm, nil, fmt.Errorf("message %q: %w", data, err)
	}
	if len(ports) == 0 {
		return pm, nil, fmt.Errorf("message %q names no port", data)
	}
	for _, a := range pm.ConnectAddrs {
		if err := checkConnectAddr(a); err != nil {
			return pm, nil, fmt.Errorf("message %q: %w", data, err)
		}
	}
	return pm, ports, nil
}

func checkConnectAddr(a core.ConnectAddr) error {
	var err error
	switch a.Network {
	case "ip+net":
		_, err = netip.ParsePrefix(a.Addr)
	case "tcp", "udp":
		_, err = netip.ParseAddrPort(a.Addr)
	default:
		err = errors.New("unknown network")
	}
	if err != nil {
		return fmt.Errorf("connectAddr %+v: %w", a, err)
	}
	return nil
}

func (p *Peer) fail(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.errs = append(p.errs, err)
}

// Entry renders a port as "proto ip:port", the peer's state entries (as
// sinktest.Entry does).
func Entry(port core.Port) string {
	ip := port.HostIP
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return fmt.Sprintf("%s %s", port.Protocol, netip.AddrPortFrom(ip, port.HostPort))
}

// State returns the ports the peer holds, as Entry renders them, sorted.
func (p *Peer) State() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.held))
	for _, e := range p.held {
		out = append(out, e)
	}
	slices.Sort(out)
	return out
}

// Received returns every message the peer took, in order, across
// restarts.
func (p *Peer) Received() []wire.PortMapping {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.received)
}

// Checks counts the connections that closed without a message.
func (p *Peer) Checks() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.checks
}

// Err returns the errors the peer met (messages it refused, ports taken
// at another address), joined.
func (p *Peer) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(p.errs...)
}
