package sockets

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
// descriptor of each inode in want. Inodes no process holds (kernel
// sockets, a process in a PID namespace this one cannot see) are left out
// of the result. Processes that go away or cannot be read are skipped.
func findHolders(proc string, want map[uint32]bool) map[uint32][]holder {
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
		fdDir := filepath.Join(proc, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		var comm string
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
			if comm == "" {
				comm = readComm(proc, e.Name())
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
