package testenv

import (
	"os"
	"sync"
	"testing"
)

// Shared is an engine that a package's tests share. It starts the first
// time a test asks for it, so a test binary that runs no integration test
// (a fuzz worker, say) starts none, and it is stopped by Close, which the
// package's TestMain calls after m.Run.
type Shared[T any] struct {
	name  string
	start func(dir string) (T, error)
	stop  func(T)

	once    sync.Once
	dir     string
	v       T
	err     error
	started bool
}

// NewShared describes an engine called name that start runs in a fresh
// directory and stop stops.
func NewShared[T any](name string, start func(dir string) (T, error), stop func(T)) *Shared[T] {
	return &Shared[T]{name: name, start: start, stop: stop}
}

// Get returns the engine, starting it on first use; if it cannot run, t
// fails or skips as Missing says.
func (s *Shared[T]) Get(t testing.TB) T {
	t.Helper()
	Integration(t)
	s.once.Do(func() {
		if s.dir, s.err = os.MkdirTemp("", "guestagent-"+s.name+"-"); s.err != nil {
			return
		}
		s.v, s.err = s.start(s.dir)
		s.started = s.err == nil
	})
	if s.err != nil {
		Missing(t, s.name+" ("+s.err.Error()+")")
	}
	return s.v
}

// Close stops the engine if it was started and removes its directory.
func (s *Shared[T]) Close() {
	if s.started {
		s.stop(s.v)
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}
