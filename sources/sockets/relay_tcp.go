package sockets

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// serveTCP accepts connections on ln until it is closed, and forwards each
// to backend, at most maxConns at once, maxPerClient of one client
// address, and as many as the relays' slots of all allow; others are
// reset. A failed accept (out of descriptors, say) pauses the relay, from
// 5 ms doubling to a second, and it accepts again: it stops only when ln
// is closed.
func (r *relays) serveTCP(ctx context.Context, ln net.Listener, backend netip.AddrPort, log *zap.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, r.maxConns)
	var mu sync.Mutex
	perClient := map[netip.Addr]int{}
	full, pause := false, time.Duration(0)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			r.load.acceptErrors.Add(1)
			r.signal()
			if pause == 0 {
				log.Warn("relay cannot accept; pausing and trying again", zap.Error(err))
				pause = 5 * time.Millisecond
			} else {
				pause = min(2*pause, time.Second)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(pause):
			}
			continue
		}
		pause = 0
		client := addrOf(c.RemoteAddr())
		mu.Lock()
		n := perClient[client]
		mu.Unlock()
		taken := false
		select {
		case slots <- struct{}{}:
			if taken = r.admit(n); !taken {
				<-slots
			}
		default:
			r.refuse()
		}
		if !taken {
			if !full {
				log.Warn("relay at a connection limit; refusing connections", zap.Int("max_conns", r.maxConns),
					zap.Int("max_per_client", r.maxPerClient), zap.Int("max_total", cap(r.total)), zap.Stringer("client", client))
				full = true
			}
			reset(c)
			continue
		}
		full = false
		mu.Lock()
		perClient[client]++
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				mu.Lock()
				if perClient[client]--; perClient[client] <= 0 {
					delete(perClient, client)
				}
				mu.Unlock()
				r.release()
				<-slots
			}()
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

// addrOf is the IP address of a, unmapped; the zero Addr when a is not
// an IP address.
func addrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
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
