package sockets

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
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

// wakeFilter is what the program leaves out in the kernel, so that
// listeners the source would not report wake nothing.
type wakeFilter struct {
	// netns is the inode number of the network namespace whose sockets
	// are read; 0 keeps every namespace's (the kernel's layout was not
	// found).
	netns uint32
	// sockNet is the offset of the socket's network namespace pointer in
	// struct sock (sk->__sk_common.skc_net.net), and netInum that of the
	// namespace's inode number in struct net (net->ns.inum); both read
	// from the kernel's BTF when netns is set.
	sockNet, netInum int32
	// comms are command names (at most 15 bytes, as the kernel keeps
	// them) whose listeners wake nothing: the ones the source leaves out.
	comms []string
	// netnsCookie is the cookie of the network namespace read, which the
	// UDP programs compare; 0 when it is not known (no UDP wake-ups),
	// and cookieErr says why.
	netnsCookie uint64
	cookieErr   error
}

// commWords returns name as the two little-endian 64-bit words of a
// 16-byte, zero-padded task command buffer.
func commWords(name string) (lo, hi int64) {
	var b [16]byte
	copy(b[:15], name)
	return int64(binary.LittleEndian.Uint64(b[:8])), int64(binary.LittleEndian.Uint64(b[8:]))
}

// Stack slots of the program, below the frame pointer R10.
const (
	slotEvent = -8  // the record: old state, new state (u32 each)
	slotRead  = -16 // what bpf_probe_read_kernel reads
	slotComm  = -32 // the current task's command name (16 bytes)
)

// wakeProgram returns a program that writes the old and new state to ring
// when a socket starts listening (any state to LISTEN) or a listener closes
// (LISTEN to CLOSE). A connection accepted from a listener is cloned from
// it and moves LISTEN to SYN_RECV; it is left out, and so is every other
// change of a connection, so connection churn wakes nothing. With f.netns
// set, a socket of another network namespace wakes nothing either (when
// the namespace cannot be read the socket wakes, erring on the side of a
// dump); nor does a change made by a task named in f.comms (docker-proxy
// opening or closing the port of a container it proxies, say).
func wakeProgram(ring *ebpf.Map, f wakeFilter) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),                // r6 = ctx: (sk, oldstate, newstate)
		asm.LoadMem(asm.R7, asm.R6, 8, asm.DWord),  // r7 = oldstate
		asm.LoadMem(asm.R8, asm.R6, 16, asm.DWord), // r8 = newstate
		asm.JEq.Imm32(asm.R8, tcpListen, "filter"),
		asm.JNE.Imm32(asm.R7, tcpListen, "out"),
		asm.JNE.Imm32(asm.R8, tcpClose, "out"),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("filter"),
	}
	if f.netns != 0 {
		insns = append(insns,
			// r3 = sk->__sk_common.skc_net.net
			asm.Mov.Reg(asm.R1, asm.R10),
			asm.Add.Imm(asm.R1, slotRead),
			asm.Mov.Imm(asm.R2, 8),
			asm.LoadMem(asm.R3, asm.R6, 0, asm.DWord),
			asm.Add.Imm(asm.R3, f.sockNet),
			asm.FnProbeReadKernel.Call(),
			asm.JNE.Imm(asm.R0, 0, "comm"),
			asm.LoadMem(asm.R3, asm.R10, slotRead, asm.DWord),
			asm.JEq.Imm(asm.R3, 0, "comm"),
			// its inode number, net->ns.inum
			asm.Add.Imm(asm.R3, f.netInum),
			asm.Mov.Reg(asm.R1, asm.R10),
			asm.Add.Imm(asm.R1, slotRead),
			asm.Mov.Imm(asm.R2, 4),
			asm.FnProbeReadKernel.Call(),
			asm.JNE.Imm(asm.R0, 0, "comm"),
			asm.LoadMem(asm.R1, asm.R10, slotRead, asm.Word),
			asm.JNE.Imm32(asm.R1, int32(f.netns), "out"),
		)
	}
	insns = append(insns, asm.Mov.Imm(asm.R0, 0).WithSymbol("comm"))
	insns = append(insns, commFilter(f.comms)...)
	return append(insns,
		asm.StoreMem(asm.R10, slotEvent, asm.R7, asm.Word).WithSymbol("emit"),
		asm.StoreMem(asm.R10, slotEvent+4, asm.R8, asm.Word),
		asm.LoadMapPtr(asm.R1, ring.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, slotEvent),
		asm.Mov.Imm(asm.R3, 8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
		asm.Return(),
	)
}

// kernelOffsets reads from the kernel's BTF where a socket's network
// namespace and a namespace's inode number are: the offsets of
// sk->__sk_common.skc_net.net in struct sock and of ns.inum in struct net.
func kernelOffsets() (sockNet, netInum int32, err error) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return 0, 0, fmt.Errorf("the kernel's BTF: %w", err)
	}
	sockNet, err = memberOffset(spec, "sock", "__sk_common", "skc_net", "net")
	if err != nil {
		return 0, 0, err
	}
	netInum, err = memberOffset(spec, "net", "ns", "inum")
	if err != nil {
		return 0, 0, err
	}
	return sockNet, netInum, nil
}

// memberOffset returns the byte offset of the member path in struct
// typ, looking through anonymous unions and structs on the way.
func memberOffset(spec *btf.Spec, typ string, path ...string) (int32, error) {
	var s *btf.Struct
	if err := spec.TypeByName(typ, &s); err != nil {
		return 0, fmt.Errorf("struct %s in the kernel's BTF: %w", typ, err)
	}
	var t btf.Type = s
	var off uint32
	for _, name := range path {
		m, at, ok := findMember(t, name)
		if !ok {
			return 0, fmt.Errorf("no member %s in struct %s's %s", name, typ, strings.Join(path, "."))
		}
		off += at
		t = m.Type
	}
	return int32(off), nil
}

// findMember finds member name in the struct or union t (behind
// typedefs and qualifiers), or in an anonymous struct or union inside it,
// and returns it with its byte offset.
func findMember(t btf.Type, name string) (btf.Member, uint32, bool) {
	var members []btf.Member
	switch u := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		members = u.Members
	case *btf.Union:
		members = u.Members
	default:
		return btf.Member{}, 0, false
	}
	for _, m := range members {
		if m.Name == name {
			return m, m.Offset.Bytes(), true
		}
		if m.Name == "" {
			if inner, at, ok := findMember(m.Type, name); ok {
				return inner, m.Offset.Bytes() + at, true
			}
		}
	}
	return btf.Member{}, 0, false
}

// netnsInode returns the inode number of the network namespace at path,
// or of the agent's own when path is empty.
func netnsInode(path string) (uint32, error) {
	if path == "" {
		path = "/proc/self/ns/net"
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("the network namespace: %w", err)
	}
	return uint32(st.Ino), nil
}

// wakeGap is the least time between two wake-ups the reader passes on.
// Records that come in between wait in the ring buffer (and when it is
// full the kernel drops them: a wake-up is due then anyway), so a flood of
// listener changes wakes the reader at most 1/wakeGap times a second.
const wakeGap = 20 * time.Millisecond

// wakeups is the loaded eBPF program and the reader of its ring buffer.
// C receives a value (never more than one pending) after one or more
// listener changes the program passes (see wakeProgram). Stopped is
// closed, with Err set, if reading the ring buffer fails.
type wakeups struct {
	C       chan struct{}
	Stopped chan struct{}
	Err     error
	// UDP is set when bound UDP sockets wake it too (see udpwake.go);
	// otherwise UDPErr says why not.
	UDP    bool
	UDPErr error

	ring *ebpf.Map
	prog *ebpf.Program
	tp   link.Link
	rd   *ringbuf.Reader
	wg   sync.WaitGroup

	bound *ebpf.Map // the UDP sockets noted
	udp   []*ebpf.Program
	links []link.Link
}

// loadWakeups loads and attaches the program and starts reading its ring
// buffer. The caller must call close.
func loadWakeups(f wakeFilter) (*wakeups, error) {
	w, err := newWakeups(f)
	if err != nil {
		return nil, err
	}
	if w.tp, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: tracepoint, Program: w.prog}); err != nil {
		w.close()
		return nil, fmt.Errorf("attaching to the %s tracepoint: %w", tracepoint, err)
	}
	w.UDPErr = w.attachUDP(f)
	w.wg.Go(w.read)
	return w, nil
}

// newWakeups loads the program with filter f, its ring buffer and the
// buffer's reader, attached to nothing.
func newWakeups(f wakeFilter) (*wakeups, error) {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
	// to the memory cgroup, where this does nothing. Without the privilege
	// to raise it the loading below fails too, and says why.
	memlockErr := rlimit.RemoveMemlock()
	w := &wakeups{C: make(chan struct{}, 1), Stopped: make(chan struct{})}
	if err := w.open(f, memlockErr); err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

// open creates the ring buffer, the program and the reader.
func (w *wakeups) open(f wakeFilter, memlockErr error) (err error) {
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
		Instructions: wakeProgram(w.ring, f),
		// bpf_probe_read_kernel, which the namespace filter calls, is
		// for GPL-compatible programs only.
		License: "Dual MIT/GPL",
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
		time.Sleep(wakeGap)
	}
}

// close detaches the program and stops the reader.
func (w *wakeups) close() {
	if w.rd != nil {
		_ = w.rd.Close()
	}
	w.wg.Wait()
	w.closeUDP()
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
