package sockets

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

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
