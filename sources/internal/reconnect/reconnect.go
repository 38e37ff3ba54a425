// Package reconnect runs an engine source's sessions one after another,
// with backoff between them, until its context is done.
package reconnect

import (
	"context"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// Session connects to the engine, reports its state and follows its events
// until the connection breaks. connected tells whether the engine answered
// at all, which resets the backoff.
type Session func(ctx context.Context) (connected bool, err error)

// Loop runs session until ctx is done. The first failure to reach the
// engine and every lost stream are logged as warnings; repeated failures
// are logged at debug level so a missing engine does not flood the log.
func Loop(ctx context.Context, log *zap.Logger, backoff core.Backoff, engine string, session Session) {
	failures := 0
	for {
		connected, err := session(ctx)
		if ctx.Err() != nil {
			return
		}
		switch {
		case connected:
			failures = 0
			log.Warn("lost the "+engine+" event stream; reconnecting", zap.Error(err))
		case failures == 0:
			log.Warn(engine+" not reachable; retrying with backoff", zap.Error(err))
		default:
			log.Debug(engine+" still not reachable", zap.Error(err))
		}
		delay := backoff.Delay(failures)
		failures++
		if !core.Sleep(ctx, delay) {
			return
		}
	}
}
