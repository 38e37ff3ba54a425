package sockets

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/guestagent/guestagent/internal/testenv"
)

// TestWakeProgramFilter runs the eBPF program in the kernel on every pair
// of TCP states and checks which ones it passes to user space: a socket
// starting to listen and a listener closing, and nothing a connection
// does, including being accepted from a listener.
func TestWakeProgramFilter(t *testing.T) {
	testenv.Integration(t) // loading the program needs root or CAP_BPF
	w, err := newWakeups(wakeFilter{})
	if err != nil {
		t.Fatalf("loading the eBPF program: %v", err)
	}
	defer w.close()
	for old := uint64(1); old <= 12; old++ {
		for new := uint64(1); new <= 12; new++ {
			ret, err := w.prog.Run(&ebpf.RunOptions{Context: []uint64{0, old, new}})
			if err != nil {
				t.Fatalf("running the program on %d -> %d: %v", old, new, err)
			}
			if ret != 0 {
				t.Errorf("%d -> %d: returned %d, want 0", old, new, ret)
			}
			want := new == tcpListen || (old == tcpListen && new == tcpClose)
			w.rd.SetDeadline(time.Now().Add(20 * time.Millisecond))
			rec, err := w.rd.Read()
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				if want {
					t.Errorf("%d -> %d: no wake-up, want one", old, new)
				}
			case err != nil:
				t.Fatalf("reading the ring buffer: %v", err)
			case !want:
				t.Errorf("%d -> %d: woke up, want nothing", old, new)
			case len(rec.RawSample) != 8 || uint64(rec.RawSample[0]) != old || uint64(rec.RawSample[4]) != new:
				t.Errorf("%d -> %d: record %v", old, new, rec.RawSample)
			}
		}
	}
}
