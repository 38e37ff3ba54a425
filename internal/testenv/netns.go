package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// NewNetns creates the network namespace name with its loopback up. The
// tests' NAT rules and engines live there, never in the machine's own
// tables. The returned function deletes it.
func NewNetns(name string) (func(), error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("ip (iproute2) not found: %w", err)
	}
	_ = exec.Command("ip", "netns", "delete", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		_ = exec.Command("ip", "netns", "delete", name).Run()
		return nil, fmt.Errorf("loopback up in %s: %v: %s", name, err, out)
	}
	return func() { _ = exec.Command("ip", "netns", "delete", name).Run() }, nil
}

// Netns creates a network namespace for t, or reports it missing.
func Netns(t testing.TB) string {
	t.Helper()
	Integration(t)
	name := fmt.Sprintf("gatest-%d-%d", os.Getpid(), nsCounter.Add(1))
	cleanup, err := NewNetns(name)
	if err != nil {
		Missing(t, "a network namespace ("+err.Error()+")")
	}
	t.Cleanup(cleanup)
	return name
}

// InNetns returns the command line that runs argv inside ns (entering only
// its network namespace, so cgroups and mounts stay as they are).
func InNetns(ns string, argv ...string) []string {
	return append([]string{"nsenter", "--net=/var/run/netns/" + ns, "--"}, argv...)
}

// IptablesWrapper writes, into dir, a script that runs iptables inside ns
// and returns its path, for components that take an iptables command;
// beside it, PATH-restore runs iptables-restore there.
func IptablesWrapper(dir, ns string) (string, error) {
	path := filepath.Join(dir, "iptables-"+ns)
	for _, cmd := range []string{"iptables", "iptables-restore"} {
		script := "#!/bin/sh\nexec " + strings.Join(InNetns(ns, cmd), " ") + " \"$@\"\n"
		if err := os.WriteFile(path+strings.TrimPrefix(cmd, "iptables"), []byte(script), 0o755); err != nil {
			return "", err
		}
	}
	return path, nil
}

// NatRules returns `iptables -t nat -S` inside ns.
func NatRules(t testing.TB, ns string) string {
	t.Helper()
	argv := InNetns(ns, "iptables", "-t", "nat", "-S")
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables -t nat -S in %s: %v: %s", ns, err, out)
	}
	return string(out)
}

// RunIn runs argv inside ns and fails t on error.
func RunIn(t testing.TB, ns string, argv ...string) string {
	t.Helper()
	full := InNetns(ns, argv...)
	out, err := exec.Command(full[0], full[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s in %s: %v: %s", strings.Join(argv, " "), ns, err, out)
	}
	return string(out)
}

// Within calls open on a thread that enters the network namespace ns (a
// name under /var/run/netns) and is then thrown away, so that no other
// goroutine ever runs there; the sockets open makes stay in ns.
func Within[T any](ns string, open func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine rather than
		// go back to the scheduler in the wrong namespace.
		runtime.LockOSThread()
		var zero T
		f, err := os.Open("/var/run/netns/" + ns)
		if err != nil {
			ch <- result{zero, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{zero, fmt.Errorf("entering network namespace %s: %w", ns, err)}
			return
		}
		v, err := open()
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}
