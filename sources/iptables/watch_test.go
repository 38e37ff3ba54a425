package iptables

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
)

// needCommands skips t under -short, and fails or skips it when one of
// cmds is not installed.
func needCommands(t testing.TB, cmds ...string) {
	t.Helper()
	testenv.Integration(t)
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			testenv.Missing(t, c)
		}
	}
}

// restoreFile writes an iptables-restore file of table with lines and
// returns its path.
func restoreFile(t testing.TB, table string, lines []string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), table+".rules")
	text := "*" + table + "\n" + strings.Join(lines, "\n") + "\nCOMMIT\n"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// unrelatedChanges makes, in ns, changes of what the source does not read,
// each its own transaction: Docker's filter chains and rules, a filter
// table restore of 500 rules, a nat chain of kube-proxy's that is not read,
// an inet table with a set, and a set of another name in a kube-proxy
// table.
func unrelatedChanges(t testing.TB, ns string) {
	t.Helper()
	var filter []string
	for i := range 500 {
		filter = append(filter, fmt.Sprintf("-A DOCKER-USER -s 198.18.%d.%d/32 -j RETURN", i/250, i%250))
	}
	for _, c := range [][]string{
		{"iptables-nft", "-t", "filter", "-N", "DOCKER-USER"},
		{"iptables-nft", "-t", "filter", "-A", "DOCKER-USER", "-j", "RETURN"},
		{"iptables-nft-restore", "--noflush", restoreFile(t, "filter", filter)},
		{"iptables-nft", "-t", "nat", "-N", "KUBE-SEP-UNREAD"},
		{"iptables-nft", "-t", "nat", "-A", "KUBE-SEP-UNREAD", "-p", "tcp", "-j", "DNAT", "--to-destination", "198.18.0.1:80"},
		{"ip6tables-nft", "-t", "nat", "-N", "KUBE-SEP-UNREAD"},
		{"nft", "add", "table", "inet", "other"},
		{"nft", "add", "set", "inet", "other", "ports", "{ type inet_service ; }"},
		{"nft", "add", "element", "inet", "other", "ports", "{ 80, 443 }"},
		{"nft", "add", "map", "ip", "kube-proxy", "no-endpoint-services", "{ type ipv4_addr . inet_proto . inet_service : verdict ; }"},
		{"nft", "add", "chain", "ip", "kube-proxy", "reject-chain"},
		{"nft", "add", "element", "ip", "kube-proxy", "no-endpoint-services", "{ 198.18.0.9 . tcp . 80 : goto reject-chain }"},
	} {
		testenv.RunIn(t, ns, c...)
	}
}

// startWatch runs watchNft in ns until the test ends and returns the count
// of its change calls.
func startWatch(t *testing.T, ns string) *atomic.Int64 {
	t.Helper()
	var calls atomic.Int64
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- watchNft(ctx, "/var/run/netns/"+ns, nil, func() { calls.Add(1) }, func() { close(ready) })
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
	return &calls
}

func waitCount(t *testing.T, what string, n *atomic.Int64, atLeast int64) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, what, func() (bool, string) {
		return n.Load() >= atLeast, fmt.Sprintf("%d, want %d", n.Load(), atLeast)
	})
}

// TestWatchIgnoresWhatTheSourceDoesNotRead makes the unrelated changes,
// then one relevant change: the watcher reports that one alone. It reads
// the notifications in order, so a report of an unrelated change would
// have come first.
func TestWatchIgnoresWhatTheSourceDoesNotRead(t *testing.T) {
	needCommands(t, "iptables-nft", "ip6tables-nft", "iptables-nft-restore", "nft")
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-NODEPORTS")
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-EXT-X")
	testenv.RunIn(t, ns, "nft", "add", "table", "ip", "kube-proxy")
	calls := startWatch(t, ns)
	unrelatedChanges(t, ns)
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "30001", "-j", "KUBE-EXT-X")
	waitCount(t, "the relevant change", calls, 1)
	if n := calls.Load(); n != 1 {
		t.Errorf("%d changes reported, want 1 (the unrelated changes were reported)", n)
	}
}

// TestWatchReportsATransactionOnce restores 1,000 KUBE-NODEPORTS rules in
// one transaction (a notification per rule), then adds 200 elements to
// kube-proxy's service-nodeports map in one nft command, then makes one
// more change: three reports in all.
func TestWatchReportsATransactionOnce(t *testing.T) {
	needCommands(t, "iptables-nft", "iptables-nft-restore", "nft")
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-NODEPORTS")
	testenv.RunIn(t, ns, "nft", "add", "table", "ip", "kube-proxy")
	testenv.RunIn(t, ns, "nft", "add", "chain", "ip", "kube-proxy", "external-x")
	testenv.RunIn(t, ns, "nft", "add", "map", "ip", "kube-proxy", "service-nodeports", "{ type inet_proto . inet_service : verdict ; }")
	calls := startWatch(t, ns)

	var rules, elems []string
	for i := range 1000 {
		rules = append(rules, fmt.Sprintf("-A KUBE-NODEPORTS -p tcp -m tcp --dport %d -j RETURN", 20000+i))
	}
	for i := range 200 {
		elems = append(elems, fmt.Sprintf("tcp . %d : goto external-x", 30000+i))
	}
	testenv.RunIn(t, ns, "iptables-nft-restore", "--noflush", restoreFile(t, "nat", rules))
	testenv.RunIn(t, ns, "nft", "add", "element", "ip", "kube-proxy", "service-nodeports", "{ "+strings.Join(elems, ", ")+" }")
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-F", "KUBE-NODEPORTS")
	waitCount(t, "three changes", calls, 3)
	if n := calls.Load(); n != 3 {
		t.Errorf("%d changes reported for three transactions", n)
	}
}

// TestNotifiedScans runs the source (with an hour between periodic scans)
// on a namespace and counts its scans: one at the start, one for a restore
// of 1,000 NodePort rules, none for the unrelated changes, and one for a
// last rule.
func TestNotifiedScans(t *testing.T) {
	needCommands(t, "iptables-nft", "ip6tables-nft", "iptables-nft-restore", "nft")
	ns := testenv.Netns(t)
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-NODEPORTS")
	testenv.RunIn(t, ns, "nft", "add", "table", "ip", "kube-proxy")
	s, err := New(Config{Netns: "/var/run/netns/" + ns, Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	router := sourcetest.Start(t, Name, s)
	scans := func(want int64) {
		t.Helper()
		if n := s.scans.Load(); n != want {
			t.Errorf("%d scans, want %d", n, want)
		}
	}
	waitCount(t, "the first scan", &s.scans, 1)

	var rules []string
	for i := range 1000 {
		rules = append(rules, fmt.Sprintf("-A KUBE-NODEPORTS -p tcp -m tcp --dport %d -j KUBE-EXT-%04d", 20000+i, i))
		rules = append([]string{fmt.Sprintf(":KUBE-EXT-%04d - [0:0]", i)}, rules...)
	}
	testenv.RunIn(t, ns, "iptables-nft-restore", "--noflush", restoreFile(t, "nat", rules))
	waitPorts(t, router, 1000)
	scans(2)

	unrelatedChanges(t, ns)
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-N", "KUBE-EXT-LAST")
	testenv.RunIn(t, ns, "iptables-nft", "-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "--dport", "30999", "-j", "KUBE-EXT-LAST")
	waitPorts(t, router, 1001)
	scans(3)
}

func waitPorts(t *testing.T, r *core.Router, n int) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, fmt.Sprintf("%d ports", n), func() (bool, string) {
		got := len(r.Desired())
		return got == n, fmt.Sprint(got)
	})
}

// simulate runs notifications (times from the start) through a pacer as
// Run does, with scans that take cost each and a first scan at 0, and
// returns the start and end of every scan.
func simulate(notes []time.Duration, cost time.Duration) (starts, ends []time.Duration) {
	var p pacer
	t0 := time.Unix(0, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	scan := func(start time.Duration, notified bool) time.Duration {
		starts, ends = append(starts, start), append(ends, start+cost)
		p.scanned(at(start), at(start+cost), notified)
		return start + cost
	}
	now := scan(0, true)
	due := time.Duration(-1)
	for i := 0; i < len(notes) || due >= 0; {
		// The next event: a due scan, or a notification (read only
		// between scans, as Run's loop does).
		if due >= 0 && (i == len(notes) || due <= max(notes[i], now)) {
			now, due = scan(due, true), -1
			continue
		}
		now = max(notes[i], now)
		i++
		if wait, ok := p.changed(at(now)); ok {
			due = now + wait
		}
	}
	return starts, ends
}

func TestPacerCoalescesABurst(t *testing.T) {
	var burst []time.Duration
	for i := range 1000 {
		burst = append(burst, time.Second+time.Duration(i)*coalesceDelay/1000)
	}
	starts, _ := simulate(burst, 2*time.Millisecond)
	if len(starts) != 2 {
		t.Fatalf("%d scans for 1,000 notifications within the coalescing delay, want the first and one more: %v", len(starts), starts)
	}
	if starts[1] != time.Second+coalesceDelay {
		t.Errorf("the notified scan started at %v, want the first notification + %v", starts[1], coalesceDelay)
	}
}

func TestPacerFollowsAScanWithOneMore(t *testing.T) {
	// Ten notifications while the first scan runs (it takes all the
	// credit): one more scan, after the coalescing delay.
	var during []time.Duration
	for i := range 10 {
		during = append(during, time.Duration(i+1)*5*time.Millisecond)
	}
	starts, _ := simulate(during, scanBurst)
	if want := scanBurst + coalesceDelay; len(starts) != 2 || starts[1] != want {
		t.Errorf("scans at %v, want at 0 and %v", starts, want)
	}
}

func TestPacerCapsTheDutyCycle(t *testing.T) {
	// A notification every millisecond for a minute, with scans of 50k
	// services (1 s): after the first, each scan overdraws the credit by
	// 900 ms and the next one waits k times that.
	var storm []time.Duration
	for i := range 60000 {
		storm = append(storm, time.Duration(i)*time.Millisecond)
	}
	const cost = time.Second
	starts, ends := simulate(storm, cost)
	for i := 1; i < len(starts); i++ {
		if gap, want := starts[i]-ends[i-1], notifyCostFactor*(cost-scanBurst); gap != want {
			t.Fatalf("scan %d started %v after the previous one ended, want %v", i, gap, want)
		}
	}
	// From the first scan's start to the last one's, the scans before it
	// were busy.
	busy := time.Duration(len(starts)-1) * cost
	total := starts[len(starts)-1] - starts[0]
	if share, limit := float64(busy)/float64(total), 1.0/notifyCostFactor+float64(scanBurst)/float64(total); share > limit {
		t.Errorf("scans took %.3f of the time, want at most %.3f", share, limit)
	}
	if len(starts) != 7 { // at 0, 10, 20, ... 60 s: the storm ends before 60, the scan at 60 reads its end
		t.Errorf("%d scans: %v", len(starts), starts)
	}
}

func TestPacerLetsCheapScansRunAtOnce(t *testing.T) {
	// A change every 40 ms for 20 s, with scans of 5 ms: the credit (4 ms
	// earned per change, 5 spent) lasts 100 changes, then scans wait k
	// times the overdraft; no scan waits longer than k times one scan.
	var changes []time.Duration
	for i := range 500 {
		changes = append(changes, time.Duration(i)*40*time.Millisecond)
	}
	const cost = 5 * time.Millisecond
	starts, ends := simulate(changes, cost)
	if len(starts) < 400 {
		t.Errorf("%d scans for 500 changes 40 ms apart", len(starts))
	}
	for i := 1; i < len(starts); i++ {
		if gap := starts[i] - ends[i-1]; gap > max(coalesceDelay+40*time.Millisecond, notifyCostFactor*cost) {
			t.Fatalf("scan %d waited %v", i, gap)
		}
	}
	// At most the credit at the start, what was earned since, and the
	// overdraft of the last scan.
	busy := time.Duration(len(starts)) * cost
	if limit := ends[len(ends)-1]/notifyCostFactor + scanBurst + cost; busy > limit {
		t.Errorf("scans took %v, more than %v", busy, limit)
	}
}
