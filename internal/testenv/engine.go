package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// BuildWebServer compiles testdata/webserver statically into dir.
func BuildWebServer(dir string) (string, error) {
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	out := filepath.Join(dir, "web")
	cmd := exec.Command("go", "build", "-o", out, "./testdata/webserver")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(root)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the test web server: %w: %s", err, b)
	}
	return out, nil
}

// KillShims kills the containerd shims whose command line names dir, and
// the container processes they run.
func KillShims(dir string) {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	shims := map[int]bool{}
	parent := map[int]int{}
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil {
			continue
		}
		if cmdline, err := os.ReadFile(p + "/cmdline"); err == nil &&
			bytes.Contains(cmdline, []byte("containerd-shim")) && bytes.Contains(cmdline, []byte(dir)) {
			shims[pid] = true
		}
		if f, err := ProcStat(pid); err == nil {
			parent[pid], _ = strconv.Atoi(f[1])
		}
	}
	for pid, ppid := range parent {
		if shims[ppid] {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for pid := range shims {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}
