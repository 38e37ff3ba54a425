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
