package iptables

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
)

// BenchmarkScan measures one full scan (reading the chains over netlink,
// or with iptables-legacy-save, or reading the nftables maps over
// netlink, then parsing) of n NodePort services in a private namespace,
// given to the source as --iptablesNetns alone.
//
// The iptables-nft-commands rows read the same iptables-nft rules with
// `iptables-nft -t nat -S CHAIN` (--iptablesCommands iptables-nft, the
// legacy reader alone), as the source did before it read them over
// netlink, for comparison on the same machine.
func BenchmarkScan(b *testing.B) {
	for _, n := range []int{1000, 10000, 50000} {
		b.Run(fmt.Sprintf("iptables-nft/%d", n), func(b *testing.B) {
			s := benchRig(b, func(ns, dir string) error { return restore(ns, dir, "iptables-nft-restore", n) })
			benchScan(b, s, n)
		})
		b.Run(fmt.Sprintf("iptables-nft-commands/%d", n), func(b *testing.B) {
			ns := benchNetns(b, func(ns, dir string) error { return restore(ns, dir, "iptables-nft-restore", n) })
			s, err := New(Config{Commands: []string{"iptables-nft"}, Netns: "/var/run/netns/" + ns})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				lines, problems := readCommands(s.cfg.Netns, s.cmds)
				if len(problems) > 0 {
					b.Fatal(problems)
				}
				if got, _ := ParseIptables(lines); len(got) != n {
					b.Fatalf("found %d ports, want %d", len(got), n)
				}
			}
		})
		if n <= 10000 {
			b.Run(fmt.Sprintf("iptables-legacy/%d", n), func(b *testing.B) {
				s := benchRig(b, func(ns, dir string) error { return restore(ns, dir, "iptables-legacy-restore", n) })
				benchScan(b, s, n)
			})
		}
		b.Run(fmt.Sprintf("nftables/%d", n), func(b *testing.B) {
			s := benchRig(b, func(ns, dir string) error { return nftLoad(ns, dir, n) })
			benchScan(b, s, n)
		})
	}
}

func benchScan(b *testing.B, s *Source, n int) {
	b.ReportAllocs()
	for b.Loop() {
		raw, problems := s.read(&scanState{}, natChanges{lost: true}, true)
		if len(problems) > 0 {
			b.Fatal(problems)
		}
		if got := len(raw.parse()); got != n {
			b.Fatalf("found %d ports, want %d", got, n)
		}
	}
}

// BenchmarkNotifiedScan measures the scan that a relevant change brings
// with n NodePort services written with iptables-nft in a private
// namespace, once the source has read them: one KUBE-NODEPORTS rule added
// or deleted with iptables-nft (not timed), its notification read by the
// source's watcher, then the scan (timed): the change applied to the
// source's copy of the chains, the legacy check, the digest and the parse.
func BenchmarkNotifiedScan(b *testing.B) {
	for _, n := range []int{1000, 10000, 50000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			ns := benchNetns(b, func(ns, dir string) error { return restore(ns, dir, "iptables-nft-restore", n) })
			s, err := New(Config{Netns: "/var/run/netns/" + ns})
			if err != nil {
				b.Fatal(err)
			}
			var calls atomic.Int64
			ready := make(chan struct{})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				done <- watchNft(ctx, s.cfg.Netns, &s.changes, func() { calls.Add(1) }, func() { close(ready) })
			}()
			b.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					b.Errorf("watchNft: %v", err)
				}
			})
			<-ready
			st := &scanState{}
			raw, problems := s.read(st, s.changes.drain(), true)
			if len(problems) > 0 {
				b.Fatal(problems)
			}
			if got := len(raw.parse()); got != n {
				b.Fatalf("found %d ports, want %d", got, n)
			}
			testenv.RunIn(b, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-EXT-BENCH")
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				before := calls.Load()
				testenv.RunIn(b, ns, "iptables-nft", "-t", "nat", []string{"-A", "-D"}[i%2], "KUBE-NODEPORTS",
					"-p", "tcp", "-m", "tcp", "--dport", "9999", "-j", "KUBE-EXT-BENCH")
				for calls.Load() == before {
					time.Sleep(time.Millisecond)
				}
				b.StartTimer()
				raw, problems := s.read(st, s.changes.drain(), false)
				if len(problems) > 0 {
					b.Fatal(problems)
				}
				_ = raw.digest()
				if got, want := len(raw.parse()), n+1-i%2; got != want {
					b.Fatalf("found %d ports, want %d", got, want)
				}
			}
		})
	}
}

// BenchmarkDeliveryLatencyLoaded is BenchmarkDeliveryLatency's
// iptables-nft row with 10,000 NodePort services loaded first (with
// iptables-nft-restore, as BenchmarkScan loads them): the time from the
// start of the iptables-nft command that adds a KUBE-NODEPORTS rule to the
// delivery of its port to a sink, one change at a time, with the default
// settings. It also reports how long the command itself took (p50), which
// grows with the rules it loads first.
func BenchmarkDeliveryLatencyLoaded(b *testing.B) {
	const n = 10000
	ns := benchNetns(b, func(ns, dir string) error { return restore(ns, dir, "iptables-nft-restore", n) })
	s, err := New(Config{Netns: "/var/run/netns/" + ns})
	if err != nil {
		b.Fatal(err)
	}
	arrivals := sourcetest.Deliver(b, Name, s)
	arrivals.Wait(b, uint16(10000+n-1), 2*time.Minute)
	ipt := func(args ...string) time.Duration {
		argv := testenv.InNetns(ns, append([]string{"iptables-nft", "-t", "nat"}, args...)...)
		start := time.Now()
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			b.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
		return time.Since(start)
	}
	var lat, cmds []time.Duration
	port := 30000
	for b.Loop() {
		for range sourcetest.LatencySamples {
			port++
			chain := fmt.Sprintf("KUBE-EXT-L%015X", port)
			ipt("-N", chain)
			start := time.Now()
			cmds = append(cmds, ipt("-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(port), "-j", chain))
			lat = append(lat, arrivals.Wait(b, uint16(port), 30*time.Second).Sub(start))
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.50)), "p50-ms")
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(slices.Max(lat)), "max-ms")
	b.ReportMetric(ms(sourcetest.Percentile(cmds, 0.50)), "command-p50-ms")
	b.ReportMetric(float64(len(lat)), "samples")
}

// benchNetns is a namespace for a benchmark, loaded by load.
func benchNetns(b *testing.B, load func(ns, dir string) error) string {
	ns := testenv.Netns(b)
	if err := load(ns, b.TempDir()); err != nil {
		b.Fatal(err)
	}
	return ns
}

func benchRig(b *testing.B, load func(ns, dir string) error) *Source {
	s, err := New(Config{Netns: "/var/run/netns/" + benchNetns(b, load)})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// restore loads n NodePort services as kube-proxy writes them (a
// KUBE-NODEPORTS, a KUBE-SERVICES and a KUBE-EXT rule each) with the
// restore command.
func restore(ns, dir, command string, n int) error {
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
	argv := testenv.InNetns(ns, command, path)
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

// cpuWindow is how long BenchmarkIdleScanCPU watches the source.
const cpuWindow = 30 * time.Second

// BenchmarkIdleScanCPU runs the source with the default settings over n
// NodePort services written with iptables-nft in a private namespace, and
// changes one rule a second there for cpuWindow: an unrelated one (a
// DOCKER-USER rule of the filter table, added then deleted), or a NodePort
// rule (a KUBE-NODEPORTS rule added, then deleted), which triggers scans.
// It reports the CPU that the process and the commands the source runs
// used over the window, as a share of one core (the rule-changing
// commands' own CPU left out), the share of the time the source spent
// scanning, and the number of scans.
func BenchmarkIdleScanCPU(b *testing.B) {
	for _, c := range []struct {
		n       int
		changes string
	}{{10000, "unrelated"}, {50000, "unrelated"}, {50000, "nodeport"}} {
		b.Run(fmt.Sprintf("%d/%s", c.n, c.changes), func(b *testing.B) {
			ns := benchNetns(b, func(ns, dir string) error { return restore(ns, dir, "iptables-nft-restore", c.n) })
			s, err := New(Config{Netns: "/var/run/netns/" + ns})
			if err != nil {
				b.Fatal(err)
			}
			r := sourcetest.Start(b, Name, s)
			testenv.Eventually(b, 2*time.Minute, fmt.Sprintf("the %d services", c.n), func() (bool, string) {
				got := len(r.Desired())
				return got >= c.n, fmt.Sprintf("the source reported %d", got)
			})
			change := func(i int) []string {
				op := []string{"-A", "-D"}[i%2]
				if c.changes == "unrelated" {
					return []string{"iptables-nft", "-t", "filter", op, "DOCKER-USER", "-s", "198.18.0.1/32", "-j", "RETURN"}
				}
				return []string{"iptables-nft", "-t", "nat", op, "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "9999", "-j", "KUBE-EXT-0000000000000000"}
			}
			testenv.RunIn(b, ns, "iptables-nft", "-t", "filter", "-N", "DOCKER-USER")
			for b.Loop() {
				cpu0, scans0, busy0 := cpuUsed(b), s.scans.Load(), s.busy.Load()
				var changers time.Duration
				start := time.Now()
				for i := 0; time.Since(start) < cpuWindow; i++ {
					argv := testenv.InNetns(ns, change(i)...)
					cmd := exec.Command(argv[0], argv[1:]...)
					if out, err := cmd.CombinedOutput(); err != nil {
						b.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
					}
					changers += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
					time.Sleep(time.Until(start.Add(time.Duration(i+1) * time.Second)))
				}
				wall := time.Since(start)
				b.ReportMetric(100*(cpuUsed(b)-cpu0-changers).Seconds()/wall.Seconds(), "cpu-%")
				b.ReportMetric(100*float64(s.busy.Load()-busy0)/float64(wall), "scanning-%")
				b.ReportMetric(float64(s.scans.Load()-scans0), "scans")
			}
		})
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
