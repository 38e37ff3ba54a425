// Package peerwatch checks a sink's peer at an interval and reports when it
// may have lost its state: it answers again after failing, or the check
// says that state is missing.
package peerwatch

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// Check asks the peer once. missing reports state the peer should have but
// has not; an error means the peer did not answer.
type Check func(ctx context.Context) (missing bool, err error)

// Run checks every interval until ctx is done and calls lost when the peer
// answers after failing, or when the check finds state missing. The first
// failure of a run of them is logged.
func Run(ctx context.Context, every time.Duration, log *zap.Logger, peer string, check Check, lost func()) {
	if every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	down := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, every)
		missing, err := check(cctx)
		cancel()
		if err != nil {
			if !down && ctx.Err() == nil {
				log.Warn(peer+" not answering", zap.Error(err))
			}
			down = true
			continue
		}
		if down || missing {
			down = false
			lost()
		}
	}
}
