package sockets

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// UDP has no tracepoint of its own. Its wake-ups come from cgroup socket
// programs attached to the root of the cgroup v2 hierarchy, which run for
// every socket of every process below it: before a bind (bind4, bind6),
// after it (post_bind4, post_bind6) and when a socket is released. They
// only ever allow what they see (they return 1).
//
// A bind of a UDP socket of the namespace read to a port the process names
// (not port 0), unless the process is one of the excluded commands, notes
// the socket by its cookie in a map (before the bind, so that no dump can
// see the socket bound and not yet noted); once bound, a noted socket
// wakes the reader, and its release wakes it again. A socket whose port
// the kernel picks, by a bind to port 0 or implicitly by a client's first
// send, is never noted: it wakes nothing, and it is not a server, so the
// source does not report it (see wakeups.serves). The sockets that were
// bound before the programs were attached are noted from the first dump
// (see noteUDP), servers or not: nothing tells the two apart any more.

// Offsets in struct bpf_sock, the context of the post_bind and release
// programs, and in struct bpf_sock_addr, that of the bind programs.
const (
	bpfSockProtocol     = 12
	bpfSockAddrUserPort = 24
	bpfSockAddrProtocol = 36
)

// udpMapSize bounds the sockets noted; past it the oldest are forgotten
// (the source then no longer reports them, and their close is seen by the
// next periodic dump alone).
const udpMapSize = 65536

// udpBindProgram returns the program for bind4 or bind6, which notes in
// bound a UDP socket of the namespace whose netns cookie is netns, bound
// to a port the process names, unless the process is one of comms.
func udpBindProgram(bound *ebpf.Map, netns uint64, comms []string) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1), // r6 = ctx (struct bpf_sock_addr)
		asm.LoadMem(asm.R1, asm.R6, bpfSockAddrProtocol, asm.Word),
		asm.JNE.Imm(asm.R1, unix.IPPROTO_UDP, "out"),
		asm.LoadMem(asm.R1, asm.R6, bpfSockAddrUserPort, asm.Word),
		asm.JEq.Imm(asm.R1, 0, "out"), // the kernel picks the port: a client's
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetNetnsCookie.Call(),
		asm.LoadImm(asm.R1, int64(netns), asm.DWord),
		asm.JNE.Reg(asm.R0, asm.R1, "out"),
	}
	insns = append(insns, commFilter(comms)...)
	return append(insns,
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.R10, slotRead, asm.R0, asm.DWord), // the key
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreMem(asm.R10, slotEvent, asm.R1, asm.Word), // the value
		asm.LoadMapPtr(asm.R1, bound.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, slotRead),
		asm.Mov.Reg(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotEvent),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnMapUpdateElem.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), // allow, always
		asm.Return(),
	)
}

// udpProgram returns the program for post_bind4, post_bind6 or
// sock_release, which writes a record (both words 0) to ring for a UDP
// socket noted in bound (see udpBindProgram), forgetting it on release.
func udpProgram(ring, bound *ebpf.Map, release bool) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1), // r6 = ctx (struct bpf_sock)
		asm.LoadMem(asm.R1, asm.R6, bpfSockProtocol, asm.Word),
		asm.JNE.Imm(asm.R1, unix.IPPROTO_UDP, "out"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.R10, slotRead, asm.R0, asm.DWord), // the key
		asm.LoadMapPtr(asm.R1, bound.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, slotRead),
	}
	if release {
		insns = append(insns,
			asm.FnMapDeleteElem.Call(),
			asm.JNE.Imm(asm.R0, 0, "out"), // not noted: a client's, or an excluded command's
		)
	} else {
		insns = append(insns,
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"), // not noted
		)
	}
	return append(insns,
		asm.Mov.Imm(asm.R1, 0),
		asm.StoreMem(asm.R10, slotEvent, asm.R1, asm.DWord),
		asm.LoadMapPtr(asm.R1, ring.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, slotEvent),
		asm.Mov.Imm(asm.R3, 8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), // allow, always
		asm.Return(),
	)
}

// commFilter jumps to "out" when the current task's command is one of
// comms; it uses R1-R5 and the stack at slotComm.
func commFilter(comms []string) asm.Instructions {
	if len(comms) == 0 {
		return nil
	}
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R10),
		asm.Add.Imm(asm.R1, slotComm),
		asm.Mov.Imm(asm.R2, 16),
		asm.FnGetCurrentComm.Call(),
		asm.JNE.Imm(asm.R0, 0, "comm_end"),
		asm.LoadMem(asm.R1, asm.R10, slotComm, asm.DWord),
		asm.LoadMem(asm.R2, asm.R10, slotComm+8, asm.DWord),
	}
	for i, name := range comms {
		lo, hi := commWords(name)
		next := fmt.Sprintf("comm%d", i+1)
		insns = append(insns,
			asm.LoadImm(asm.R3, lo, asm.DWord),
			asm.JNE.Reg(asm.R1, asm.R3, next),
			asm.LoadImm(asm.R3, hi, asm.DWord),
			asm.JEq.Reg(asm.R2, asm.R3, "out"),
			asm.Mov.Imm(asm.R0, 0).WithSymbol(next),
		)
	}
	return append(insns, asm.Mov.Imm(asm.R0, 0).WithSymbol("comm_end"))
}

// attachUDP loads the UDP programs and attaches them to the root of the
// cgroup v2 hierarchy; on an error nothing of them is left.
func (w *wakeups) attachUDP(f wakeFilter) error {
	if f.netnsCookie == 0 {
		return fmt.Errorf("the network namespace's cookie is not known: %w", f.cookieErr)
	}
	root, err := cgroup2Root("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	if w.bound, err = ebpf.NewMap(&ebpf.MapSpec{Name: "udp_bound", Type: ebpf.LRUHash, KeySize: 8, ValueSize: 4, MaxEntries: udpMapSize}); err != nil {
		return fmt.Errorf("creating the map of bound UDP sockets: %w", err)
	}
	programs := []struct {
		typ   ebpf.ProgramType
		at    ebpf.AttachType
		insns asm.Instructions
	}{
		{ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Bind, udpBindProgram(w.bound, f.netnsCookie, f.comms)},
		{ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Bind, udpBindProgram(w.bound, f.netnsCookie, f.comms)},
		{ebpf.CGroupSock, ebpf.AttachCGroupInet4PostBind, udpProgram(w.ring, w.bound, false)},
		{ebpf.CGroupSock, ebpf.AttachCGroupInet6PostBind, udpProgram(w.ring, w.bound, false)},
		{ebpf.CGroupSock, ebpf.AttachCgroupInetSockRelease, udpProgram(w.ring, w.bound, true)},
	}
	for _, p := range programs {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         "udp_changes",
			Type:         p.typ,
			AttachType:   p.at,
			Instructions: p.insns,
			License:      "Dual MIT/GPL",
		})
		if err != nil {
			w.closeUDP()
			return fmt.Errorf("loading the UDP program (%s): %w", p.at, err)
		}
		w.udp = append(w.udp, prog)
		l, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: p.at, Program: prog})
		if err != nil {
			w.closeUDP()
			return fmt.Errorf("attaching the UDP program (%s) to %s: %w", p.at, root, err)
		}
		w.links = append(w.links, l)
	}
	w.UDP = true
	return nil
}

// noteUDP notes the cookies of UDP sockets a dump found, so that their
// release wakes the reader too.
func (w *wakeups) noteUDP(cookies []uint64) {
	if w.bound == nil {
		return
	}
	one := uint32(1)
	for _, c := range cookies {
		_ = w.bound.Update(c, one, ebpf.UpdateAny)
	}
}

// serves reports whether the UDP socket with cookie is a server: one
// noted by the programs (bound to a port its process named) or by
// noteUDP (bound before them).
func (w *wakeups) serves(cookie uint64) bool {
	var v uint32
	return w.bound != nil && w.bound.Lookup(cookie, &v) == nil
}

func (w *wakeups) closeUDP() {
	for _, l := range w.links {
		_ = l.Close()
	}
	for _, p := range w.udp {
		_ = p.Close()
	}
	if w.bound != nil {
		_ = w.bound.Close()
	}
	w.links, w.udp, w.bound, w.UDP = nil, nil, nil, false
}

// cgroup2Root returns the mount point of the cgroup v2 hierarchy's root
// from a mountinfo file.
func cgroup2Root(mountinfo string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", fmt.Errorf("finding the cgroup v2 hierarchy: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, fs := strings.Fields(pre), strings.Fields(post)
		if ok && len(fields) >= 5 && len(fs) >= 1 && fs[0] == "cgroup2" && fields[3] == "/" {
			return unescapeMount(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("finding the cgroup v2 hierarchy: %w", err)
	}
	return "", errors.New("no cgroup v2 hierarchy is mounted")
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var n int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &n); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// netnsCookie returns the cookie of the network namespace at path (the
// agent's own when empty), from a socket opened in it.
func netnsCookie(path string) (uint64, error) {
	var cookie uint64
	var err error
	get := func() {
		var fd int
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	}
	if path == "" {
		get()
	} else {
		t, terr := startNetnsThread(path)
		if terr != nil {
			return 0, terr
		}
		defer t.close()
		if derr := t.do(get); derr != nil {
			return 0, derr
		}
	}
	if err != nil {
		return 0, fmt.Errorf("the network namespace's cookie: %w", err)
	}
	return cookie, nil
}
