// Package oneshot delivers PortMappings the way wsl-proxy and the vtunnel
// peer take them: one connection per message, carrying one JSON document
// and no reply.
package oneshot

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
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
	return nil
}
