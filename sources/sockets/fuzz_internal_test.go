package sockets

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// FuzzSocketInode feeds arbitrary descriptor link targets (as
// /proc/PID/fd/N reads) to the parser: it accepts exactly
// "socket:[N]" with N a 32-bit decimal number, and returns N.
func FuzzSocketInode(f *testing.F) {
	for _, s := range []string{"socket:[12345]", "socket:[]", "socket:[4294967296]", "pipe:[1]", "/dev/null", "anon_inode:[eventfd]", "socket:[+1]"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, link []byte) {
		ino, ok := socketInode(link)
		num, isSocket := strings.CutPrefix(string(link), "socket:[")
		num, closed := strings.CutSuffix(num, "]")
		want, err := strconv.ParseUint(num, 10, 32)
		if wantOK := isSocket && closed && err == nil; ok != wantOK || ok && uint64(ino) != want {
			t.Fatalf("socketInode(%q) = %d, %t", link, ino, ok)
		}
	})
}

// FuzzCgroup2Root feeds arbitrary /proc/self/mountinfo contents to the
// parser: no panic, and a root it finds is the mount point field of a
// cgroup2 line, unescaped.
func FuzzCgroup2Root(f *testing.F) {
	f.Add("36 35 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n")
	f.Add("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n40 1 0:35 / /sys/fs/cgroup/unified\\040dir rw - cgroup2 cgroup2 rw\n")
	f.Add("36 35 0:30 /sub /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
	f.Fuzz(func(t *testing.T, mountinfo string) {
		path := filepath.Join(t.TempDir(), "mountinfo")
		if err := os.WriteFile(path, []byte(mountinfo), 0o600); err != nil {
			t.Fatal(err)
		}
		root, err := cgroup2Root(path)
		if err != nil {
			return
		}
		found := false
		for line := range strings.Lines(mountinfo) {
			pre, post, ok := strings.Cut(strings.TrimSuffix(line, "\n"), " - ")
			fields, fs := strings.Fields(pre), strings.Fields(post)
			if ok && len(fields) >= 5 && len(fs) >= 1 && fs[0] == "cgroup2" && unescapeMount(fields[4]) == root {
				found = true
				break
			}
		}
		if !found {
			t.Fatalf("root %q is no cgroup2 line's mount point in %q", root, mountinfo)
		}
	})
}
