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
// backend over its client's session, opening one per client address and
// port (at most maxConns at once, maxPerClient of one client address, and
// as many as the relays' slots of all allow); replies go back to the
// client from pc.
func (r *relays) serveUDP(ctx context.Context, pc *net.UDPConn, backend netip.AddrPort, log *zap.Logger) {
	var (
		mu        sync.Mutex
		sessions  = map[netip.AddrPort]*udpSession{}
		perClient = map[netip.Addr]int{} // sessions by client address
		wg        sync.WaitGroup
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
		count, ofClient := len(sessions), perClient[from.Addr()]
		mu.Unlock()
		if s == nil {
			if count >= r.maxConns {
				r.refuse()
			}
			if count >= r.maxConns || !r.admit(ofClient) {
				if !full {
					log.Warn("relay at a session limit; dropping datagrams of new sessions", zap.Int("max_sessions", r.maxConns),
						zap.Int("max_per_client", r.maxPerClient), zap.Int("max_total", cap(r.total)), zap.Stringer("client", from.Addr()))
					full = true
				}
				continue
			}
			full = false
			c, err := r.dial("udp", backend)
			if err != nil {
				r.release()
				log.Debug("cannot open a socket to the relayed socket", zap.Error(err))
				continue
			}
			s = &udpSession{conn: c.(*net.UDPConn)}
			s.last.Store(time.Now().UnixNano())
			mu.Lock()
			if ctx.Err() != nil {
				mu.Unlock()
				_ = s.conn.Close()
				r.release()
				return
			}
			sessions[from] = s
			perClient[from.Addr()]++
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.replies(pc, s, from)
				mu.Lock()
				if sessions[from] == s {
					delete(sessions, from)
				}
				if perClient[from.Addr()]--; perClient[from.Addr()] <= 0 {
					delete(perClient, from.Addr())
				}
				mu.Unlock()
				_ = s.conn.Close()
				r.release()
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
