package sockets

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"go.uber.org/zap"
)

// DefaultExcludeCommands are the processes whose sockets are not a user's
// ports: those left to the sources that already report them (Docker's and
// rootless engines' port proxies, containerd's shims:
// "containerd-shim-runc-v2" shows as "containerd-shim", the kernel keeps
// 15 bytes of a command name), and the agent's peers in the guest, whose
// listeners are the agent's own doing or its channel to the host (the
// vtunnel peer's listener, wsl-proxy's listeners for the ports it was
// sent: reporting those would expose each port twice, or a port to
// itself).
var DefaultExcludeCommands = []string{"docker-proxy", "rootlessport", "containerd-shim", "vtunnel", "wsl-proxy"}

// holder is a process with a descriptor of a socket.
type holder struct {
	pid  int
	comm string
}

// findHolders scans proc (normally /proc) for the processes that hold a
// descriptor of each inode in want, among those that keep says matter
// (by pid and command name): only their descriptors are read, so a scan
// costs one small read per process plus the descriptors of the few kept.
// Inodes no kept process holds (kernel sockets, a process in a PID
// namespace this one cannot see) are left out of the result. Processes
// that go away or cannot be read are skipped.
func findHolders(proc string, want map[uint32]bool, keep func(pid int, comm string) bool) map[uint32][]holder {
	out := map[uint32][]holder{}
	if len(want) == 0 {
		return out
	}
	entries, err := os.ReadDir(proc)
	if err != nil {
		return out
	}
	var link []byte
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		comm := readComm(proc, e.Name())
		if !keep(pid, comm) {
			continue
		}
		fdDir := filepath.Join(proc, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil {
				continue
			}
			link = append(link[:0], target...)
			ino, ok := socketInode(link)
			if !ok || !want[ino] {
				continue
			}
			out[ino] = appendHolder(out[ino], holder{pid, comm})
		}
	}
	return out
}

func appendHolder(hs []holder, h holder) []holder {
	for _, x := range hs {
		if x.pid == h.pid {
			return hs
		}
	}
	return append(hs, h)
}

// socketInode parses a descriptor's link target "socket:[12345]".
func socketInode(link []byte) (uint32, bool) {
	rest, ok := bytes.CutPrefix(link, []byte("socket:["))
	if !ok {
		return 0, false
	}
	num, ok := bytes.CutSuffix(rest, []byte("]"))
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(string(num), 10, 32)
	if err != nil {
		return 0, false
	}
	return uint32(n), true
}

func readComm(proc, pid string) string {
	b, err := os.ReadFile(filepath.Join(proc, pid, "comm"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// judge decides, for each id that has settled, whether it is reported: not
// when every socket behind it is held by the agent itself or by a process
// of ExcludeCommands. Only settled sockets are looked up in /proc, in one
// scan, so short-lived sockets cost nothing. A socket no visible process
// holds (another PID namespace sharing the network, a kernel socket) is
// reported.
func (s *Source) judge(g *gate, ready []string) {
	if len(ready) == 0 {
		return
	}
	want := map[uint32]bool{}
	for _, id := range ready {
		for _, ino := range g.inodes(id) {
			want[ino] = true
		}
	}
	// Only the agent's and the excluded commands' descriptors decide.
	holders := findHolders("/proc", want, func(pid int, comm string) bool {
		return pid == s.self || slices.Contains(s.cfg.ExcludeCommands, comm)
	})
	for _, id := range ready {
		if why, ok := s.excludedOwner(g.inodes(id), holders); ok {
			g.exclude(id)
			s.log.Debug("socket left out", zap.String("id", id), zap.String("held_by", why))
			continue
		}
		g.report(id)
	}
}

// excludedOwner reports whether every one of inodes is held by the agent
// or an excluded command, and names one such holder.
func (s *Source) excludedOwner(inodes []uint32, holders map[uint32][]holder) (string, bool) {
	why := ""
	for _, ino := range inodes {
		h, ok := s.excludedHolder(holders[ino])
		if !ok {
			return "", false
		}
		why = h
	}
	return why, why != ""
}

func (s *Source) excludedHolder(hs []holder) (string, bool) {
	for _, h := range hs {
		if h.pid == s.self {
			return "the agent", true
		}
		if slices.Contains(s.cfg.ExcludeCommands, h.comm) {
			return fmt.Sprintf("%s (pid %d)", h.comm, h.pid), true
		}
	}
	return "", false
}
