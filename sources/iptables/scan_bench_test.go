package iptables

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/core/testenv"
)

// BenchmarkScan measures one full scan (listing the chains through the
// real iptables command, or reading the nftables maps over netlink, then
// parsing) of n NodePort services in a private namespace.
func BenchmarkScan(b *testing.B) {
	for _, n := range []int{1000, 10000, 50000} {
		b.Run(fmt.Sprintf("iptables-nft/%d", n), func(b *testing.B) {
			s := benchRig(b, "iptables-nft", func(ns, dir string) error {
				return restore(ns, dir, n)
			})
			benchScan(b, s, n)
		})
		b.Run(fmt.Sprintf("nftables/%d", n), func(b *testing.B) {
			s := benchRig(b, "iptables-nft", func(ns, dir string) error {
				return nftLoad(ns, dir, n)
			})
			benchScan(b, s, n)
		})
	}
}

func benchScan(b *testing.B, s *Source, n int) {
	b.ReportAllocs()
	for b.Loop() {
		raw, problems := s.read()
		if len(problems) > 0 {
			b.Fatal(problems)
		}
		if got := len(raw.parse()); got != n {
			b.Fatalf("found %d ports, want %d", got, n)
		}
	}
}

func benchRig(b *testing.B, command string, load func(ns, dir string) error) *Source {
	ns := testenv.Netns(b)
	dir := b.TempDir()
	if err := load(ns, dir); err != nil {
		b.Fatal(err)
	}
	wrapper := filepath.Join(dir, "wrapper")
	script := "#!/bin/sh\nexec " + strings.Join(testenv.InNetns(ns, command), " ") + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{Commands: []string{wrapper}, Netns: "/var/run/netns/" + ns})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

func restore(ns, dir string, n int) error {
	var sb strings.Builder
	sb.WriteString("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n")
	for i := range n {
		fmt.Fprintf(&sb, ":KUBE-EXT-%016X - [0:0]\n:KUBE-SVC-%016X - [0:0]\n", i, i)
	}
	for i := range n {
		fmt.Fprintf(&sb, "-A KUBE-NODEPORTS -p tcp -m comment --comment \"ns/svc-%d:http\" -m tcp --dport %d -j KUBE-EXT-%016X\n", i, 10000+i, i)
		fmt.Fprintf(&sb, "-A KUBE-SERVICES -d 10.43.%d.%d/32 -p tcp -m comment --comment \"ns/svc-%d:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-%016X\n", i/256, i%256, i, i)
		fmt.Fprintf(&sb, "-A KUBE-EXT-%016X -j KUBE-SVC-%016X\n", i, i)
	}
	sb.WriteString("COMMIT\n")
	path := filepath.Join(dir, "rules")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		return err
	}
	argv := testenv.InNetns(ns, "iptables-nft-restore", path)
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func nftLoad(ns, dir string, n int) error {
	var sb strings.Builder
	sb.WriteString("table ip kube-proxy {\n")
	for i := range n {
		fmt.Fprintf(&sb, "\tchain external-%08X-ns/svc-%d/tcp/http {\n\t}\n", i, i)
	}
	sb.WriteString("\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n\t\telements = { ")
	for i := range n {
		if i > 0 {
			sb.WriteString(",\n\t\t\t")
		}
		fmt.Fprintf(&sb, "tcp . %d : goto external-%08X-ns/svc-%d/tcp/http", 10000+i, i, i)
	}
	sb.WriteString(" }\n\t}\n}\n")
	path := filepath.Join(dir, "ruleset.nft")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		return err
	}
	argv := testenv.InNetns(ns, "nft", "-f", path)
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// idleScanWindow is how long BenchmarkIdleScanCPU watches the source.
const idleScanWindow = 30 * time.Second

// BenchmarkIdleScanCPU runs the source with the default interval over 10k
// NodePort services that do not change, in a private namespace, and reports
// the CPU that it and the iptables commands it runs use, as a share of one
// core.
func BenchmarkIdleScanCPU(b *testing.B) {
	const n = 10000
	s := benchRig(b, "iptables-nft", func(ns, dir string) error { return restore(ns, dir, n) })
	r := sourcetest.Start(b, Name, s)
	deadline := time.Now().Add(time.Minute)
	for len(r.Desired()) < n {
		if time.Now().After(deadline) {
			b.Fatalf("the source reported %d of %d services", len(r.Desired()), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for b.Loop() {
		before := cpuUsed(b)
		time.Sleep(idleScanWindow)
		b.ReportMetric(100*(cpuUsed(b)-before).Seconds()/idleScanWindow.Seconds(), "cpu-%")
	}
}

// cpuUsed is the CPU time this process and its finished children used.
func cpuUsed(b *testing.B) time.Duration {
	var total time.Duration
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			b.Fatal(err)
		}
		total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return total
}
