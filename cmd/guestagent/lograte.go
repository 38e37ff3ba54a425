package main

import (
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Repeated log lines are limited per message: of the lines at info level
// and above that share a message (per-port lines differ only in their
// fields), the first logBurst of each logInterval are written, and the
// others are counted and summed up in one line at the end of the interval.
// Anyone on the machine can make ports come and go, so without this an
// unprivileged user could fill the disk through the agent's log. Debug
// lines, asked for, are never limited.
const (
	logInterval = 10 * time.Second
	logBurst    = 10
)

// logLimiter counts the lines its sampler drops and writes the summaries.
// It arms a timer only when a line was dropped: at rest it costs nothing.
type logLimiter struct {
	out zapcore.Core // the core the summaries go to, unlimited

	mu      sync.Mutex
	dropped map[logLine]int
	timer   *time.Timer
	stopped bool
}

// logLine is what the limiter tells lines apart by.
type logLine struct {
	level   zapcore.Level
	message string
}

// limitRepeats wraps core so that repeated lines are limited as described
// above. The limiter's Stop writes the summaries still pending.
func limitRepeats(core zapcore.Core) (zapcore.Core, *logLimiter) {
	l := &logLimiter{out: core, dropped: map[logLine]int{}}
	sampled := zapcore.NewSamplerWithOptions(core, logInterval, logBurst, 0, zapcore.SamplerHook(l.hook))
	return &debugBypass{Core: sampled, plain: core}, l
}

func (l *logLimiter) hook(e zapcore.Entry, d zapcore.SamplingDecision) {
	if d&zapcore.LogDropped == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return
	}
	l.dropped[logLine{e.Level, e.Message}]++
	if l.timer == nil {
		l.timer = time.AfterFunc(logInterval, l.flush)
	}
}

// flush writes one summary per message that had lines dropped.
func (l *logLimiter) flush() {
	l.mu.Lock()
	dropped := l.dropped
	l.dropped, l.timer = map[logLine]int{}, nil
	l.mu.Unlock()
	for k, n := range dropped {
		ent := zapcore.Entry{Level: k.level, Time: time.Now(), Message: "repeated log lines suppressed"}
		if ce := l.out.Check(ent, nil); ce != nil {
			ce.Write(zap.String("message", k.message), zap.Int("suppressed", n), zap.Duration("within", logInterval))
		}
	}
}

// Stop writes the pending summaries and ends the limiter's timer; lines
// dropped after it are not counted.
func (l *logLimiter) Stop() {
	l.mu.Lock()
	l.stopped = true
	if l.timer != nil {
		l.timer.Stop()
	}
	l.mu.Unlock()
	l.flush()
}

// debugBypass sends debug lines past the sampler.
type debugBypass struct {
	zapcore.Core
	plain zapcore.Core
}

func (c *debugBypass) With(fields []zapcore.Field) zapcore.Core {
	return &debugBypass{Core: c.Core.With(fields), plain: c.plain.With(fields)}
}

func (c *debugBypass) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if e.Level == zapcore.DebugLevel {
		return c.plain.Check(e, ce)
	}
	return c.Core.Check(e, ce)
}
