package sockets

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
)

// Wake-up modes (Config.Wakeups).
const (
	// WakeupsAuto loads the eBPF program when the kernel allows it and
	// falls back to the periodic dump alone otherwise.
	WakeupsAuto = "auto"
	// WakeupsEBPF requires the eBPF program: Run fails when it cannot load.
	WakeupsEBPF = "ebpf"
	// WakeupsOff never loads it: the periodic dump alone.
	WakeupsOff = "off"
)

// TCP states, as in the kernel's include/net/tcp_states.h.
const (
	tcpClose  = 7
	tcpListen = 10
)

// tracepoint is the kernel's tracepoint for socket state changes. Attached
// as a raw tracepoint it needs neither tracefs nor BTF; its arguments are
// (const struct sock *sk, int oldstate, int newstate), one u64 each.
const tracepoint = "inet_sock_set_state"

// wakeProgram returns a program that writes the old and new state to ring
// when a socket starts listening (any state to LISTEN) or a listener closes
// (LISTEN to CLOSE). A connection accepted from a listener is cloned from
// it and moves LISTEN to SYN_RECV; it is left out, and so is every other
// change of a connection, so connection churn wakes nothing. The program
// sees every network namespace: the reader dumps its own namespace, which
// costs one dump per burst of wake-ups.
func wakeProgram(ring *ebpf.Map) asm.Instructions {
	return asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 8, asm.DWord),  // r2 = oldstate
		asm.LoadMem(asm.R3, asm.R1, 16, asm.DWord), // r3 = newstate
		asm.JEq.Imm32(asm.R3, tcpListen, "emit"),
		asm.JNE.Imm32(asm.R2, tcpListen, "out"),
		asm.JNE.Imm32(asm.R3, tcpClose, "out"),
		asm.StoreMem(asm.R10, -8, asm.R2, asm.Word).WithSymbol("emit"),
		asm.StoreMem(asm.R10, -4, asm.R3, asm.Word),
		asm.LoadMapPtr(asm.R1, ring.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -8),
		asm.Mov.Imm(asm.R3, 8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
		asm.Return(),
	}
}

// wakeups is the loaded eBPF program and the reader of its ring buffer.
// C receives a value (never more than one pending) after one or more
// listener changes anywhere on the machine. Stopped is closed, with Err
// set, if reading the ring buffer fails.
type wakeups struct {
	C       chan struct{}
	Stopped chan struct{}
	Err     error

	ring *ebpf.Map
	prog *ebpf.Program
	tp   link.Link
	rd   *ringbuf.Reader
	wg   sync.WaitGroup
}

// loadWakeups loads and attaches the program and starts reading its ring
// buffer. The caller must call close.
func loadWakeups() (*wakeups, error) {
	w, err := newWakeups()
	if err != nil {
		return nil, err
	}
	if w.tp, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: tracepoint, Program: w.prog}); err != nil {
		w.close()
		return nil, fmt.Errorf("attaching to the %s tracepoint: %w", tracepoint, err)
	}
	w.wg.Go(w.read)
	return w, nil
}

// newWakeups loads the program, its ring buffer and the buffer's reader,
// attached to nothing.
func newWakeups() (*wakeups, error) {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
	// to the memory cgroup, where this does nothing. Without the privilege
	// to raise it the loading below fails too, and says why.
	memlockErr := rlimit.RemoveMemlock()
	w := &wakeups{C: make(chan struct{}, 1), Stopped: make(chan struct{})}
	if err := w.open(memlockErr); err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

// open creates the ring buffer, the program and the reader.
func (w *wakeups) open(memlockErr error) (err error) {
	// One page: 256 events of 16 bytes. When it is full a wake-up is
	// already due, so a dropped event loses nothing.
	if w.ring, err = ebpf.NewMap(&ebpf.MapSpec{Name: "listen_changes", Type: ebpf.RingBuf, MaxEntries: 4096}); err != nil {
		if memlockErr != nil {
			return fmt.Errorf("creating the eBPF ring buffer: %w (and raising the locked-memory limit: %v)", err, memlockErr)
		}
		return fmt.Errorf("creating the eBPF ring buffer: %w", err)
	}
	if w.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "listen_changes",
		Type:         ebpf.RawTracepoint,
		Instructions: wakeProgram(w.ring),
		License:      "MIT",
	}); err != nil {
		return fmt.Errorf("loading the eBPF program: %w", err)
	}
	if w.rd, err = ringbuf.NewReader(w.ring); err != nil {
		return fmt.Errorf("reading the eBPF ring buffer: %w", err)
	}
	return nil
}

// read turns ring buffer records into wake-ups until the reader is closed
// or fails.
func (w *wakeups) read() {
	var rec ringbuf.Record
	for {
		if err := w.rd.ReadInto(&rec); err != nil {
			if !errors.Is(err, ringbuf.ErrClosed) {
				w.Err = fmt.Errorf("reading the eBPF ring buffer: %w", err)
				close(w.Stopped)
			}
			return
		}
		select {
		case w.C <- struct{}{}:
		default:
		}
	}
}

// close detaches the program and stops the reader.
func (w *wakeups) close() {
	if w.rd != nil {
		_ = w.rd.Close()
	}
	w.wg.Wait()
	if w.tp != nil {
		_ = w.tp.Close()
	}
	if w.prog != nil {
		_ = w.prog.Close()
	}
	if w.ring != nil {
		_ = w.ring.Close()
	}
}
