// Package oneshot delivers PortMappings the way wsl-proxy and the vtunnel
// peer take them: one connection per message, carrying one JSON document
// and no reply.
package oneshot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/wire"
)

// Dialer opens a connection to the peer.
type Dialer func(ctx context.Context) (net.Conn, error)

// Send dials the peer, writes pm as one JSON document and closes the
// connection. Failures to connect or write are marked core.PeerDown: the
// peer is gone or restarting.
func Send(ctx context.Context, dial Dialer, pm wire.PortMapping) error {
	return send(ctx, dial, pm, 0)
}

// SendApplied is Send for a peer that closes the connection once it has
// applied the message, and handles each connection on its own (wsl-proxy):
// after writing, it waits up to wait for that close, so that the next
// message, sent on a connection of its own, cannot be applied before this
// one. A peer that keeps the connection open longer is an error (not
// PeerDown: the peer took the message), so the change is tried again.
func SendApplied(ctx context.Context, dial Dialer, pm wire.PortMapping, wait time.Duration) error {
	if wait <= 0 {
		return errors.New("oneshot: SendApplied needs a positive wait")
	}
	return send(ctx, dial, pm, wait)
}

func send(ctx context.Context, dial Dialer, pm wire.PortMapping, wait time.Duration) error {
	conn, err := dial(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		return core.PeerDown(fmt.Errorf("connecting: %w", err))
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := json.NewEncoder(conn).Encode(pm); err != nil {
		return core.PeerDown(fmt.Errorf("writing: %w", err))
	}
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	if wait == 0 {
		return nil
	}
	until := time.Now().Add(wait)
	if dl, ok := ctx.Deadline(); ok && dl.Before(until) {
		until = dl
	}
	if ctx.Err() == nil {
		_ = conn.SetReadDeadline(until)
	}
	// The peer sends nothing; whatever it might send is read and dropped
	// until it closes.
	const most = 1 << 16
	n, err := io.Copy(io.Discard, io.LimitReader(conn, most))
	switch {
	case err == nil && n == most:
		return fmt.Errorf("the peer answered with %d bytes or more; it answers nothing", n)
	case err == nil, errors.Is(err, syscall.ECONNRESET):
		// Closed. A unix socket closed with data left unread (the line
		// end after the document) reads as a reset.
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("the peer took the message but did not close the connection within %s, so it may not have applied it yet", wait)
	default:
		return fmt.Errorf("waiting for the peer to close the connection: %w", err)
	}
}
