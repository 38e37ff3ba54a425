package sockets

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
)

func cand(port uint16, inodes ...uint32) candidate {
	return candidate{port: core.Port{Protocol: core.TCP, ContainerPort: port, HostIP: netip.IPv4Unspecified(), HostPort: port}, inodes: inodes}
}

// TestGateHoldsBackUntilSettledAndRemovesAtOnce walks a gate with a
// settle time of 300ms through scans at the given offsets.
func TestGateHoldsBackUntilSettledAndRemovesAtOnce(t *testing.T) {
	const settle = 300 * time.Millisecond
	t0 := time.Unix(1000, 0)
	type scan struct {
		at        time.Duration
		seen      map[string]candidate
		ready     []string
		gone      []string
		transient []string
		next      time.Duration
	}
	a, b := cand(8000, 1), cand(9000, 2)
	scans := []scan{
		{at: 0, seen: map[string]candidate{"a": a}, next: settle},
		{at: 100 * time.Millisecond, seen: map[string]candidate{"a": a, "b": b}, next: 200 * time.Millisecond},
		// b lived less than the settle time: never ready.
		{at: 200 * time.Millisecond, seen: map[string]candidate{"a": a}, transient: []string{"b"}, next: 100 * time.Millisecond},
		{at: 300 * time.Millisecond, seen: map[string]candidate{"a": a}, ready: []string{"a"}},
		// Reported and still there: nothing to do.
		{at: 1300 * time.Millisecond, seen: map[string]candidate{"a": a}},
		// Gone on the first scan without it.
		{at: 2300 * time.Millisecond, seen: map[string]candidate{}, gone: []string{"a"}},
		// Back: judged afresh from the start.
		{at: 2400 * time.Millisecond, seen: map[string]candidate{"a": a}, next: settle},
		// Other sockets took the identity before it settled: the wait starts again.
		{at: 2600 * time.Millisecond, seen: map[string]candidate{"a": cand(8000, 7)}, next: settle},
		{at: 2900 * time.Millisecond, seen: map[string]candidate{"a": cand(8000, 7)}, ready: []string{"a"}},
	}
	g := newGate(settle)
	for i, s := range scans {
		ready, gone, transient, next := g.observe(t0.Add(s.at), s.seen)
		if !slices.Equal(ready, s.ready) || !slices.Equal(gone, s.gone) || !slices.Equal(transient, s.transient) || next != s.next {
			t.Fatalf("scan %d at %v: ready %v gone %v transient %v next %v; want %v %v %v %v",
				i, s.at, ready, gone, transient, next, s.ready, s.gone, s.transient, s.next)
		}
		for _, id := range ready {
			g.report(id)
		}
	}
	if got := g.reported(); len(got) != 1 || got[0].ID != "a" || got[0].Ports[0].HostPort != 8000 {
		t.Errorf("reported %v, want a on 8000", got)
	}
}

func TestGateKeepsExcludedIdentityQuiet(t *testing.T) {
	g := newGate(time.Millisecond)
	t0 := time.Unix(1000, 0)
	seen := map[string]candidate{"p": cand(8080, 5)}
	g.observe(t0, seen)
	ready, _, _, _ := g.observe(t0.Add(time.Second), seen)
	if !slices.Equal(ready, []string{"p"}) {
		t.Fatalf("ready %v", ready)
	}
	g.exclude("p")
	for i := 2; i < 5; i++ {
		if ready, gone, transient, next := g.observe(t0.Add(time.Duration(i)*time.Second), seen); len(ready)+len(gone)+len(transient) != 0 || next != 0 {
			t.Fatalf("an excluded identity came back: %v %v %v %v", ready, gone, transient, next)
		}
	}
	if ready, gone, transient, _ := g.observe(t0.Add(10*time.Second), nil); len(ready)+len(gone)+len(transient) != 0 {
		t.Fatalf("an excluded identity's removal was reported: %v %v %v", ready, gone, transient)
	}
	if len(g.reported()) != 0 {
		t.Fatal("an excluded identity was reported")
	}
}

func TestSocketInode(t *testing.T) {
	tests := []struct {
		link string
		ino  uint32
		ok   bool
	}{
		{"socket:[346230]", 346230, true},
		{"socket:[4294967295]", 4294967295, true},
		{"socket:[4294967296]", 0, false},
		{"socket:[]", 0, false},
		{"socket:[12", 0, false},
		{"pipe:[12]", 0, false},
		{"/dev/null", 0, false},
		{"anon_inode:[eventpoll]", 0, false},
	}
	for _, tt := range tests {
		ino, ok := socketInode([]byte(tt.link))
		if ino != tt.ino || ok != tt.ok {
			t.Errorf("socketInode(%q) = %d, %v; want %d, %v", tt.link, ino, ok, tt.ino, tt.ok)
		}
	}
}
