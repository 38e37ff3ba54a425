package loopbacknat_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

var guest = netip.MustParseAddr("192.168.127.2")

// setup makes a namespace with the rule dockerd writes for
// -p 127.0.0.1:8081:80, and a manager for the docker source in it.
func setup(t *testing.T) (string, *loopbacknat.Manager) {
	t.Helper()
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", "DOCKER")
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-A", "DOCKER", "-d", "127.0.0.1/32", "!", "-i", "docker0",
		"-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "DNAT", "--to-destination", "198.18.0.2:80")
	return ns, manager(t, ns, "docker", "DOCKER")
}

func manager(t *testing.T, ns, owner, chain string) *loopbacknat.Manager {
	t.Helper()
	wrapper, err := testenv.IptablesWrapper(t.TempDir(), ns)
	if err != nil {
		t.Fatal(err)
	}
	m, err := loopbacknat.New(loopbacknat.Config{Owner: owner, Iptables: wrapper, Chain: chain, Interface: "eth0", GuestIP: guest})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

var b8081 = loopbacknat.Binding{Protocol: core.TCP, HostPort: 8081, Backend: netip.MustParseAddrPort("198.18.0.2:80")}

var rules8081 = []string{
	`-A DOCKER -d 192.168.127.2/32 -i eth0 -p tcp -m tcp --dport 8081 -m comment --comment "guestagent-loopback:docker" -j DNAT --to-destination 198.18.0.2:80`,
}

// ours returns the lines of rules that carry comment (any loopback NAT
// comment when it is empty).
func ours(rules, comment string) []string {
	var out []string
	for l := range strings.Lines(rules) {
		if strings.Contains(l, `--comment "`+comment) || comment == "" && strings.Contains(l, loopbacknat.CommentPrefix) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}

func TestRulesAddedAfterDockersAndRemoved(t *testing.T) {
	ns, m := setup(t)
	for range 2 { // the second Set must not duplicate anything
		if err := m.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
			t.Fatal(err)
		}
	}
	all := testenv.NatRules(t, ns)
	if got := strings.Join(ours(all, ""), "\n"); got != strings.Join(rules8081, "\n") {
		t.Fatalf("rules:\n%s\nwant:\n%s", got, strings.Join(rules8081, "\n"))
	}
	docker := strings.Index(all, "-A DOCKER -d 127.0.0.1/32")
	appended := strings.Index(all, rules8081[0])
	if docker < 0 || appended < docker {
		t.Errorf("the guest-address rule must come after Docker's own:\n%s", all)
	}
	if err := m.Remove("c1"); err != nil {
		t.Fatal(err)
	}
	if got := ours(testenv.NatRules(t, ns), ""); len(got) != 0 {
		t.Errorf("rules left after removal: %v", got)
	}
	if !strings.Contains(testenv.NatRules(t, ns), "-A DOCKER -d 127.0.0.1/32") {
		t.Error("Docker's own rule was touched")
	}
}

// TestEveryRuleIsBoundToTheTunnel pins the narrowness: each binding has
// one rule, in the engine's chain, which matches only the guest address
// and the tunnel interface; nothing goes into PREROUTING or POSTROUTING.
func TestEveryRuleIsBoundToTheTunnel(t *testing.T) {
	ns, m := setup(t)
	udp := loopbacknat.Binding{Protocol: core.UDP, HostPort: 5353, Backend: netip.MustParseAddrPort("198.18.0.2:53"), Chain: "DOCKER"}
	if err := m.Set("c1", []loopbacknat.Binding{b8081, udp}); err != nil {
		t.Fatal(err)
	}
	got := ours(testenv.NatRules(t, ns), "")
	if len(got) != 2 {
		t.Fatalf("%d rules, want 2: %v", len(got), got)
	}
	for _, r := range got {
		if !strings.HasPrefix(r, "-A DOCKER ") || !strings.Contains(r, " -d 192.168.127.2/32 -i eth0 ") {
			t.Errorf("rule not in the engine's chain, bound to the tunnel: %s", r)
		}
	}
}

func TestSetReplacesChangedBindings(t *testing.T) {
	ns, m := setup(t)
	udp := loopbacknat.Binding{Protocol: core.UDP, HostPort: 5353, Backend: netip.MustParseAddrPort("198.18.0.2:53")}
	if err := m.Set("c1", []loopbacknat.Binding{b8081, udp}); err != nil {
		t.Fatal(err)
	}
	if n := len(ours(testenv.NatRules(t, ns), "")); n != 2 {
		t.Fatalf("%d rules, want 2", n)
	}
	if err := m.Set("c1", []loopbacknat.Binding{udp}); err != nil {
		t.Fatal(err)
	}
	got := ours(testenv.NatRules(t, ns), "")
	if len(got) != 1 || strings.Contains(strings.Join(got, ""), "8081") {
		t.Errorf("after dropping 8081: %v", got)
	}
}

func TestSyncRemovesLeftovers(t *testing.T) {
	ns, m := setup(t)
	old := loopbacknat.Binding{Protocol: core.TCP, HostPort: 9999, Backend: netip.MustParseAddrPort("198.18.0.9:80")}
	if err := m.Set("gone", []loopbacknat.Binding{old}); err != nil {
		t.Fatal(err)
	}
	if err := m.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
		t.Fatal(err)
	}
	// The PREROUTING and POSTROUTING rules earlier versions wrote for
	// each binding.
	for _, r := range [][]string{
		{"PREROUTING", "-d", "192.168.127.2/32", "-i", "eth0", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-m", "comment", "--comment", "guestagent-loopback:docker", "-j", "DNAT", "--to-destination", "127.0.0.1:8081"},
		{"POSTROUTING", "-s", "127.0.0.1/32", "-o", "eth0", "-p", "tcp", "-m", "tcp", "--sport", "8081", "-m", "comment", "--comment", "guestagent-loopback:docker", "-j", "MASQUERADE"},
	} {
		testenv.RunIn(t, ns, append([]string{"iptables", "-t", "nat", "-A"}, r...)...)
	}
	// A new manager, as after an agent restart, knows only what runs now.
	fresh := manager(t, ns, "docker", "DOCKER")
	if err := fresh.Sync(map[string][]loopbacknat.Binding{"c1": {b8081}}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(ours(testenv.NatRules(t, ns), ""), "\n"); got != strings.Join(rules8081, "\n") {
		t.Errorf("after Sync:\n%s\nwant:\n%s", got, strings.Join(rules8081, "\n"))
	}
}

// TestSyncLeavesOtherOwnersRules runs the managers of the docker and the
// containerd source in one namespace, as with --docker --containerd: the
// Sync of either deletes neither the other's rules in the shared chains
// nor those in the other's engine chains, and both delete untagged rules
// of earlier agent versions.
func TestSyncLeavesOtherOwnersRules(t *testing.T) {
	ns, docker := setup(t)
	containerd := manager(t, ns, "containerd", "")
	const cniChain = "CNI-DN-0123456789abcdef01234"
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", cniChain)
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-A", cniChain, "-d", "127.0.0.1/32", "-p", "tcp", "-m", "tcp",
		"--dport", "9090", "-j", "DNAT", "--to-destination", "198.18.20.2:80")
	cni := loopbacknat.Binding{Protocol: core.TCP, HostPort: 9090, Backend: netip.MustParseAddrPort("198.18.20.2:80"), Chain: cniChain}
	// What an earlier version wrote for both: any interface, any address.
	legacy := [][]string{
		{"PREROUTING", "-d", "192.168.127.2/32", "-p", "tcp", "-m", "tcp", "--dport", "7070", "-m", "comment", "--comment", loopbacknat.CommentPrefix, "-j", "DNAT", "--to-destination", "127.0.0.1:7070"},
		{"DOCKER", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-m", "comment", "--comment", loopbacknat.CommentPrefix, "-j", "DNAT", "--to-destination", "198.18.0.2:80"},
		{cniChain, "-p", "tcp", "-m", "tcp", "--dport", "9090", "-m", "comment", "--comment", loopbacknat.CommentPrefix, "-j", "DNAT", "--to-destination", "198.18.20.2:80"},
	}
	for _, r := range legacy {
		testenv.RunIn(t, ns, append([]string{"iptables", "-t", "nat", "-A"}, r...)...)
	}
	// Another tool's rule whose comment merely starts alike.
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "6060",
		"-m", "comment", "--comment", loopbacknat.CommentPrefix+"s", "-j", "ACCEPT")

	if err := docker.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
		t.Fatal(err)
	}
	if err := containerd.Set("default/c2", []loopbacknat.Binding{cni}); err != nil {
		t.Fatal(err)
	}
	cniRules := ours(testenv.NatRules(t, ns), containerd.Comment())
	if len(cniRules) != 1 {
		t.Fatalf("containerd's rules: %v", cniRules)
	}

	check := func(step string, wantDocker bool) {
		t.Helper()
		all := testenv.NatRules(t, ns)
		if got := ours(all, containerd.Comment()); !slices.Equal(got, cniRules) {
			t.Errorf("%s: containerd's rules\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(cniRules, "\n"))
		}
		want := rules8081
		if !wantDocker {
			want = nil
		}
		if got := ours(all, docker.Comment()); !slices.Equal(got, want) {
			t.Errorf("%s: docker's rules\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if !strings.Contains(all, "--comment "+loopbacknat.CommentPrefix+"s ") {
			t.Errorf("%s: a rule with another comment was deleted", step)
		}
	}
	if err := docker.Sync(map[string][]loopbacknat.Binding{"c1": {b8081}}); err != nil {
		t.Fatal(err)
	}
	check("docker's Sync", true)
	if err := containerd.Sync(map[string][]loopbacknat.Binding{"default/c2": {cni}}); err != nil {
		t.Fatal(err)
	}
	check("containerd's Sync", true)
	if err := docker.Sync(nil); err != nil {
		t.Fatal(err)
	}
	check("docker's Sync with no containers", false)
	all := testenv.NatRules(t, ns)
	for l := range strings.Lines(all) {
		if strings.Contains(l, "--comment "+loopbacknat.CommentPrefix+" ") {
			t.Errorf("untagged rule of an earlier version left: %s", strings.TrimSpace(l))
		}
	}
}

func TestIsOwnRule(t *testing.T) {
	for comment, want := range map[string]bool{
		"guestagent-loopback":            true,
		"guestagent-loopback:docker":     true,
		"guestagent-loopback:containerd": true,
		"guestagent-loopbacks":           false,
		"guestagent":                     false,
		"":                               false,
		`dnat name: "cbr0" id: "8e1c"`:   false,
	} {
		if got := loopbacknat.IsOwnRule(comment); got != want {
			t.Errorf("IsOwnRule(%q) = %v", comment, got)
		}
	}
	if c := loopbacknat.OwnerComment("docker"); !loopbacknat.IsOwnRule(c) {
		t.Errorf("OwnerComment gives %q, not recognised", c)
	}
}

func TestNewChecksConfig(t *testing.T) {
	good := loopbacknat.Config{Owner: "docker", Interface: "eth0", GuestIP: guest}
	for name, edit := range map[string]func(*loopbacknat.Config){
		"no owner":      func(c *loopbacknat.Config) { c.Owner = "" },
		"owner a:b":     func(c *loopbacknat.Config) { c.Owner = "a:b" },
		"owner a b":     func(c *loopbacknat.Config) { c.Owner = "a b" },
		"no interface":  func(c *loopbacknat.Config) { c.Interface = "" },
		"no guest IP":   func(c *loopbacknat.Config) { c.GuestIP = netip.Addr{} },
		"IPv6 guest IP": func(c *loopbacknat.Config) { c.GuestIP = netip.MustParseAddr("fd00::2") },
	} {
		cfg := good
		edit(&cfg)
		if _, err := loopbacknat.New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestInvalidBindingsAreIgnored(t *testing.T) {
	for _, b := range []loopbacknat.Binding{
		{Protocol: core.TCP, HostPort: 0, Backend: netip.MustParseAddrPort("198.18.0.2:80")},
		{Protocol: core.TCP, HostPort: 80, Backend: netip.MustParseAddrPort("[fd00::2]:80")},
		{Protocol: "icmp", HostPort: 80, Backend: netip.MustParseAddrPort("198.18.0.2:80")},
		{Protocol: core.TCP, HostPort: 80},
	} {
		if loopbacknat.Valid(b) {
			t.Errorf("%+v reported valid", b)
		}
	}
}

// TestQueueAppliesLatestRequestsInTurn queues requests before the queue
// runs: an owner that asks twice gets its latest rules, an owner whose
// last request is a removal gets none, and the rules appear once the queue
// runs. Requests queued before a Sync are dropped: the Sync's own state
// wins.
func TestQueueAppliesLatestRequestsInTurn(t *testing.T) {
	ns, m := setup(t)
	udp := loopbacknat.Binding{Protocol: core.UDP, HostPort: 5353, Backend: netip.MustParseAddrPort("198.18.0.2:53")}
	m.Queue("c1", []loopbacknat.Binding{b8081})
	m.Queue("c2", []loopbacknat.Binding{udp})
	m.Queue("c1", []loopbacknat.Binding{udp}) // replaces c1's first request
	m.Queue("c3", []loopbacknat.Binding{b8081})
	m.Queue("c3", nil)
	if n := m.Pending(); n != 3 {
		t.Fatalf("%d owners waiting, want 3", n)
	}
	if got := ours(testenv.NatRules(t, ns), ""); len(got) != 0 {
		t.Fatalf("rules before the queue ran: %v", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.RunQueue(ctx) }()
	defer func() { cancel(); <-done }()
	testenv.Eventually(t, 30*time.Second, "the queue to drain", func() (bool, string) {
		got := ours(testenv.NatRules(t, ns), "")
		return m.Pending() == 0 && len(got) == 1, strings.Join(got, "\n")
	})
	got := strings.Join(ours(testenv.NatRules(t, ns), ""), "\n")
	if strings.Contains(got, "8081") || !strings.Contains(got, "5353") {
		t.Errorf("rules after the queue ran (want 5353 alone, once: c1 and c2 share it):\n%s", got)
	}

	// Stop the queue, queue a request, then sync without it: the request
	// is dropped and never applied.
	cancel()
	<-done
	m.Queue("c4", []loopbacknat.Binding{b8081})
	if err := m.Sync(map[string][]loopbacknat.Binding{"c2": {udp}}); err != nil {
		t.Fatal(err)
	}
	if n := m.Pending(); n != 0 {
		t.Errorf("%d owners waiting after a Sync, want 0", n)
	}
	if got := strings.Join(ours(testenv.NatRules(t, ns), ""), "\n"); strings.Contains(got, "8081") {
		t.Errorf("a request from before the Sync was applied:\n%s", got)
	}
}

// TestOptionsFromFlags pins the flags' names and defaults, and that
// options with the rules off build no manager.
func TestOptionsFromFlags(t *testing.T) {
	var o loopbacknat.Options
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	loopbacknat.BindFlags(fs, "docker", &o)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	want := loopbacknat.Options{Enabled: true, Iptables: "iptables", Interface: "eth0", GuestIP: "192.168.127.2"}
	if o != want {
		t.Errorf("defaults %+v, want %+v", o, want)
	}
	if err := fs.Parse([]string{"--dockerLoopbackNAT=false", "--dockerIptables=ipt", "--dockerNATInterface=tun0", "--dockerNATGuestIP=10.0.0.2"}); err != nil {
		t.Fatal(err)
	}
	want = loopbacknat.Options{Iptables: "ipt", Interface: "tun0", GuestIP: "10.0.0.2"}
	if o != want {
		t.Errorf("parsed %+v, want %+v", o, want)
	}
	if m, err := o.Manager("docker", "DOCKER", nil, nil); m != nil || err != nil {
		t.Errorf("rules off: manager %v, error %v; want neither", m, err)
	}
}

// TestEachRuleCostsOneRun counts the iptables runs (through a wrapper that
// logs each one): a binding's rule costs one run to add and one to
// delete, setting an owner's bindings again costs none, and a
// rule two owners share is written once and deleted only when the last of
// them lets it go.
func TestEachRuleCostsOneRun(t *testing.T) {
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", "DOCKER")
	counting, runs := countingIptables(t, ns)
	m, err := loopbacknat.New(loopbacknat.Config{Owner: "docker", Iptables: counting, Chain: "DOCKER", Interface: "eth0", GuestIP: guest})
	if err != nil {
		t.Fatal(err)
	}
	count := func() int {
		data, err := os.ReadFile(runs)
		if os.IsNotExist(err) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		n := strings.Count(string(data), "\n")
		if err := os.Remove(runs); err != nil {
			t.Fatal(err)
		}
		return n
	}
	count() // New's own check that iptables runs
	for _, step := range []struct {
		what  string
		do    func() error
		runs  int
		rules int
	}{
		{"c1 publishes 8081", func() error { return m.Set("c1", []loopbacknat.Binding{b8081}) }, 1, 1},
		{"c1 again, unchanged", func() error { return m.Set("c1", []loopbacknat.Binding{b8081}) }, 0, 1},
		{"c2 publishes the same", func() error { return m.Set("c2", []loopbacknat.Binding{b8081}) }, 0, 1},
		{"c1 goes", func() error { return m.Remove("c1") }, 0, 1},
		{"c2 goes", func() error { return m.Remove("c2") }, 1, 0},
		{"c2 goes again", func() error { return m.Remove("c2") }, 0, 0},
	} {
		if err := step.do(); err != nil {
			t.Fatalf("%s: %v", step.what, err)
		}
		if n := count(); n != step.runs {
			t.Errorf("%s: %d iptables runs, want %d", step.what, n, step.runs)
		}
		if got := ours(testenv.NatRules(t, ns), ""); len(got) != step.rules {
			t.Errorf("%s: rules %v, want %d of them", step.what, got, step.rules)
		}
	}
	// A rule someone else deleted is no error to delete again.
	if err := m.Set("c3", []loopbacknat.Binding{b8081}); err != nil {
		t.Fatal(err)
	}
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-F", "DOCKER")
	if err := m.Remove("c3"); err != nil {
		t.Errorf("removing rules an engine flushed: %v", err)
	}
	if got := ours(testenv.NatRules(t, ns), ""); len(got) != 0 {
		t.Errorf("rules left: %v", got)
	}
}

// TestEntriesGetRulesToo: with a further way in (wsl-proxy's upstream),
// each binding gets one more rule, in the engine's chain, matching that
// interface and address; removing the binding removes both.
func TestEntriesGetRulesToo(t *testing.T) {
	ns, _ := setup(t)
	wrapper, err := testenv.IptablesWrapper(t.TempDir(), ns)
	if err != nil {
		t.Fatal(err)
	}
	upstream := loopbacknat.Entry{Interface: "veth-rd-ns", Addr: netip.MustParseAddr("192.168.143.1")}
	m, err := loopbacknat.New(loopbacknat.Config{Owner: "docker", Iptables: wrapper, Chain: "DOCKER", Interface: "eth0", GuestIP: guest,
		Entries: []loopbacknat.Entry{upstream, {Interface: "eth0", Addr: guest}}}) // the tunnel's again: no second rule
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(rules8081),
		`-A DOCKER -d 192.168.143.1/32 -i veth-rd-ns -p tcp -m tcp --dport 8081 -m comment --comment "guestagent-loopback:docker" -j DNAT --to-destination 198.18.0.2:80`)
	if got := ours(testenv.NatRules(t, ns), ""); !slices.Equal(got, want) {
		t.Errorf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if err := m.Remove("c1"); err != nil {
		t.Fatal(err)
	}
	if got := ours(testenv.NatRules(t, ns), ""); len(got) != 0 {
		t.Errorf("rules left: %v", got)
	}
	if _, err := loopbacknat.New(loopbacknat.Config{Owner: "docker", Iptables: wrapper, Interface: "eth0", GuestIP: guest,
		Entries: []loopbacknat.Entry{{Interface: "veth-rd-ns"}}}); err == nil {
		t.Error("an entry without an address was accepted")
	}
}

// countingIptables writes iptables and iptables-restore commands that run
// in ns and log each run ("iptables ARGS" or "iptables-restore ARGS") to
// the file it returns too.
func countingIptables(t *testing.T, ns string) (counting, runs string) {
	t.Helper()
	dir := t.TempDir()
	wrapper, err := testenv.IptablesWrapper(dir, ns)
	if err != nil {
		t.Fatal(err)
	}
	runs = filepath.Join(dir, "runs")
	counting = filepath.Join(dir, "iptables-counting")
	for _, suffix := range []string{"", "-restore"} {
		script := fmt.Sprintf("#!/bin/sh\necho \"iptables%s $*\" >> %s\nexec %s%s \"$@\"\n", suffix, runs, wrapper, suffix)
		if err := os.WriteFile(counting+suffix, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return counting, runs
}

// TestQueuedBurstIsOneRestore queues the bindings of 40 containers (each
// with a rule for the tunnel and one for an entry) before the queue runs:
// they are written in one iptables-restore run, not 80 iptables runs, and
// removed the same way. A batch iptables-restore refuses (a rule to
// delete that an engine flushed) is applied rule by rule instead.
func TestQueuedBurstIsOneRestore(t *testing.T) {
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", "DOCKER")
	counting, runs := countingIptables(t, ns)
	entry := loopbacknat.Entry{Interface: "veth-rd-ns", Addr: netip.MustParseAddr("192.168.143.1")}
	m, err := loopbacknat.New(loopbacknat.Config{Owner: "docker", Iptables: counting, Chain: "DOCKER", Interface: "eth0", GuestIP: guest, Entries: []loopbacknat.Entry{entry}})
	if err != nil {
		t.Fatal(err)
	}
	runsOf := func() (plain, restore int) {
		data, _ := os.ReadFile(runs)
		_ = os.Remove(runs)
		for l := range strings.Lines(string(data)) {
			if strings.HasPrefix(l, "iptables-restore ") {
				restore++
			} else {
				plain++
			}
		}
		return plain, restore
	}
	runsOf() // New's own check
	const n = 40
	owners := func(bind bool) {
		for i := range n {
			var bs []loopbacknat.Binding
			if bind {
				bs = []loopbacknat.Binding{{Protocol: core.TCP, HostPort: uint16(9000 + i), Backend: netip.AddrPortFrom(netip.MustParseAddr("198.18.0.2"), 80)}}
			}
			m.Queue(fmt.Sprintf("c%d", i), bs)
		}
	}
	run := func(what string, want int) {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); m.RunQueue(ctx) }()
		testenv.Eventually(t, 30*time.Second, what, func() (bool, string) {
			got := len(ours(testenv.NatRules(t, ns), ""))
			return got == want && m.Pending() == 0, fmt.Sprintf("%d rules", got)
		})
		cancel()
		<-done
	}
	owners(true)
	run("the burst's rules", 2*n)
	if plain, restore := runsOf(); plain != 0 || restore != 1 {
		t.Errorf("the burst took %d iptables and %d iptables-restore runs, want 0 and 1", plain, restore)
	}
	owners(false)
	run("the burst's rules gone", 0)
	if plain, restore := runsOf(); plain != 0 || restore != 1 {
		t.Errorf("removing the burst took %d iptables and %d iptables-restore runs, want 0 and 1", plain, restore)
	}

	// An engine flushes its chain; the batch that deletes its rules (and
	// adds others) is refused whole, and applied rule by rule.
	owners(true)
	run("the burst's rules again", 2*n)
	runsOf()
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-F", "DOCKER")
	for i := range n {
		var bs []loopbacknat.Binding
		if i == 0 {
			bs = []loopbacknat.Binding{{Protocol: core.UDP, HostPort: 9999, Backend: netip.MustParseAddrPort("198.18.0.3:53")}}
		}
		m.Queue(fmt.Sprintf("c%d", i), bs)
	}
	run("the new binding's rules alone", 2)
	if plain, restore := runsOf(); restore != 1 || plain != 2*n+2 {
		t.Errorf("after the flush: %d iptables and %d iptables-restore runs, want %d and 1", plain, restore, 2*n+2)
	}
}
