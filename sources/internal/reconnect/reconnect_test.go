package reconnect_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/internal/reconnect"
)

// TestLoopLogsOutagesOnceAndStopsWithItsContext runs sessions that fail to
// connect twice, connect and lose the stream, fail once more, and then
// see the context cancelled. The first failure to connect and the lost
// stream are warnings; a repeated failure is a debug line, and so is a
// failure right after a lost stream, which the stream's warning already
// announced. Loop returns once the context is done, without logging the
// last session.
func TestLoopLogsOutagesOnceAndStopsWithItsContext(t *testing.T) {
	obs, logs := observer.New(zapcore.DebugLevel)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		connected bool
		err       error
	}
	script := []result{
		{false, errors.New("refused 1")},
		{false, errors.New("refused 2")},
		{true, errors.New("stream broke")},
		{false, errors.New("refused 3")},
	}
	calls := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		reconnect.Loop(ctx, zap.New(obs), backoff, "Engine", func(ctx context.Context) (bool, error) {
			defer func() { calls++ }()
			if calls == len(script) {
				cancel()
				return true, ctx.Err()
			}
			return script[calls].connected, script[calls].err
		})
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Loop did not return after its context was cancelled")
	}
	if calls != len(script)+1 {
		t.Errorf("%d sessions, want %d", calls, len(script)+1)
	}
	var got []string
	for _, e := range logs.All() {
		got = append(got, fmt.Sprintf("%s %s: %v", e.Level, e.Message, e.ContextMap()["error"]))
	}
	want := []string{
		"warn Engine not reachable; retrying with backoff: refused 1",
		"debug Engine still not reachable: refused 2",
		"warn lost the Engine event stream; reconnecting: stream broke",
		"debug Engine still not reachable: refused 3",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("logged:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestLoopReturnsDuringBackoff cancels the context while Loop waits out
// its backoff: it returns without another session.
func TestLoopReturnsDuringBackoff(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		reconnect.Loop(ctx, zap.NewNop(), core.Backoff{Initial: time.Hour, Max: time.Hour}, "Engine",
			func(context.Context) (bool, error) {
				calls++
				cancel()
				return false, errors.New("refused")
			})
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Loop did not return during its backoff")
	}
	if calls != 1 {
		t.Errorf("%d sessions, want 1", calls)
	}
}

var backoff = core.Backoff{Initial: time.Millisecond, Max: time.Millisecond}
