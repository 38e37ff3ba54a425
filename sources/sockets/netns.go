package sockets

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

var errNetnsClosed = errors.New("the network namespace's thread has stopped")

// netnsThread is a goroutine locked to an OS thread that has entered a
// network namespace, where it runs the functions given to do: sockets
// made there stay in that namespace. The thread is never handed back to
// the runtime, so no other goroutine runs in the namespace; it ends with
// close. A nil *netnsThread runs functions on the caller's goroutine.
type netnsThread struct {
	work   chan func()
	done   chan struct{}
	mu     sync.Mutex // guards closed, and sends on work against close
	closed bool
}

func startNetnsThread(path string) (*netnsThread, error) {
	t := &netnsThread{work: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		defer close(t.done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		f, err := os.Open(path)
		if err != nil {
			ready <- fmt.Errorf("opening network namespace: %w", err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		_ = f.Close()
		if err != nil {
			ready <- fmt.Errorf("entering network namespace %s: %w", path, err)
			return
		}
		ready <- nil
		for fn := range t.work {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		<-t.done
		return nil, err
	}
	return t, nil
}

// do runs fn on the thread and waits for it.
func (t *netnsThread) do(fn func()) error {
	if t == nil {
		fn()
		return nil
	}
	finished := make(chan struct{})
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return errNetnsClosed
	}
	t.work <- func() { defer close(finished); fn() }
	t.mu.Unlock()
	<-finished
	return nil
}

// close ends the thread once the function it runs returns.
func (t *netnsThread) close() {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.closed = true
	close(t.work)
	t.mu.Unlock()
	<-t.done
}
