package iptables

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/google/nftables"

	"github.com/guestagent/guestagent/internal/testenv"
)

// countingDumper counts the chains a natCache dumps.
type countingDumper struct {
	*ruleDumper
	dumps *int
}

func (c countingDumper) handledRules(table *nftables.Table, chain string) ([]handledRule, bool, error) {
	*c.dumps++
	return c.ruleDumper.handledRules(table, chain)
}

// TestCacheFollowsNotifications keeps a natCache of a namespace's
// iptables-nft chains from the notifications of changes made with the
// real iptables-nft, ip6tables-nft and nft (appends, inserts, an in-place
// replacement, deletions, a restore, flushes, a CNI-DN chain jumped to
// and no longer, a deleted and re-made nat table), and after each change
// compares what the cache holds with a fresh dump of every chain, rule for
// rule, and the service ports it keeps (one change at a time, or made
// again after a restore or a flush) with those of the dump. It also counts the chains dumped again: none, except a CNI-DN
// chain once CNI-HOSTPORT-DNAT jumps to it, and maybe the chain of the
// replacement (the kernel notifies the old rule's deletion, then the new
// one's addition under the same handle; the opposite order would have the
// chain dumped again).
func TestCacheFollowsNotifications(t *testing.T) {
	const anyDumps = -1
	needCommands(t, "iptables-nft", "ip6tables-nft", "iptables-nft-restore", "nft")
	ns := testenv.Netns(t)
	ipt := func(args ...string) []string { return append([]string{"iptables-nft", "-t", "nat"}, args...) }
	for _, c := range [][]string{
		ipt("-N", "KUBE-NODEPORTS"), ipt("-N", "KUBE-SERVICES"), ipt("-N", "KUBE-EXT-A"),
		ipt("-N", "CNI-HOSTPORT-DNAT"), ipt("-N", "CNI-DN-x"),
		ipt("-A", "CNI-DN-x", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "10.0.0.2:80"),
		ipt("-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "30000", "-j", "KUBE-EXT-A"),
	} {
		testenv.RunIn(t, ns, c...)
	}

	var log ruleLog
	var calls atomic.Int64
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- watchNft(ctx, "/var/run/netns/"+ns, &log, func() { calls.Add(1) }, func() { close(ready) })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("watchNft: %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("watchNft: %v", err)
	}

	d, err := newRuleDumper("/var/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	dumps := 0
	open := func() (chainDumper, error) { return countingDumper{d, &dumps}, nil }
	var c natCache
	c.apply(log.drain())
	if _, err := c.read(open); err != nil {
		t.Fatal(err)
	}

	var services []string
	for i := range 300 {
		services = append(services, fmt.Sprintf("-A KUBE-SERVICES -d 10.43.%d.%d/32 -p tcp -m tcp --dport 80 -j KUBE-EXT-A", i/256, i%256))
	}
	ip6 := func(args ...string) []string { return append([]string{"ip6tables-nft", "-t", "nat"}, args...) }
	steps := []struct {
		cmds      [][]string
		wantDumps int
	}{
		{[][]string{ipt("-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "30001", "-j", "KUBE-EXT-A")}, 0},
		{[][]string{ipt("-I", "KUBE-NODEPORTS", "1", "-p", "udp", "-m", "udp", "--dport", "30002", "-j", "KUBE-EXT-A")}, 0},
		{[][]string{ipt("-R", "KUBE-NODEPORTS", "1", "-p", "udp", "-m", "udp", "--dport", "30003", "-j", "KUBE-EXT-A")}, anyDumps},
		{[][]string{ipt("-D", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "30001", "-j", "KUBE-EXT-A")}, 0},
		{[][]string{{"iptables-nft-restore", "--noflush", restoreFile(t, "nat", services)}}, 0},
		{[][]string{ipt("-A", "CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "multiport", "--dports", "8080", "-j", "CNI-DN-x")}, 1},
		{[][]string{ipt("-A", "CNI-DN-x", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "DNAT", "--to-destination", "10.0.0.2:81")}, 0},
		{[][]string{ipt("-D", "KUBE-SERVICES", "-d", "10.43.0.5/32", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "KUBE-EXT-A")}, 0},
		{[][]string{ipt("-A", "KUBE-SERVICES", "-d", "10.43.9.9/32", "-p", "udp", "-m", "udp", "--dport", "53", "-j", "KUBE-EXT-A")}, 0},
		{[][]string{ipt("-F", "KUBE-SERVICES")}, 0},
		{[][]string{ip6("-N", "KUBE-NODEPORTS"), ip6("-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "30100", "-j", "RETURN")}, 0},
		{[][]string{ipt("-D", "CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "multiport", "--dports", "8080", "-j", "CNI-DN-x")}, 0},
		{[][]string{ipt("-F", "CNI-DN-x"), ipt("-X", "CNI-DN-x")}, 0},
		{[][]string{{"nft", "delete", "table", "ip", "nat"}}, 0},
		{[][]string{ipt("-N", "KUBE-NODEPORTS"), ipt("-A", "KUBE-NODEPORTS", "-p", "sctp", "-m", "sctp", "--dport", "30200", "-j", "RETURN")}, 0},
	}
	for i, step := range steps {
		for _, cmd := range step.cmds {
			n := calls.Load()
			testenv.RunIn(t, ns, cmd...)
			waitCount(t, fmt.Sprintf("step %d's notification", i), &calls, n+1)
		}
		dumps = 0
		c.apply(log.drain())
		chains, err := c.read(open)
		if err != nil {
			t.Fatal(err)
		}
		var cached []rule
		for _, chain := range chains {
			cached = append(cached, chain.all()...)
		}
		fresh, err := readNatNft(d)
		if err != nil {
			t.Fatal(err)
		}
		sortRules(cached)
		sortRules(fresh)
		if !slices.Equal(cached, fresh) {
			t.Errorf("step %d (%v): the cache and a dump differ:\n%s", i, step.cmds, diffRules(cached, fresh))
		}
		var lists [][]ServicePort
		for _, chain := range chains {
			ports, _ := chain.classified()
			lists = append(lists, ports)
		}
		freshPorts, _ := portsOf(fresh)
		if got, want := portIDs(mergePorts(lists...)), portIDs(freshPorts); got != want {
			t.Errorf("step %d (%v): ports from the cache %s, from a dump %s", i, step.cmds, got, want)
		}
		if step.wantDumps != anyDumps && dumps != step.wantDumps {
			t.Errorf("step %d (%v): %d chains dumped again, want %d", i, step.cmds, dumps, step.wantDumps)
		}
	}
}
