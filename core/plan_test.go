package core

import (
	"context"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// planFixture is one key's exposures for the plan tests: web is what a
// claim wants, moved leads the same host port elsewhere, and twin is web
// under another claim, which the peer cannot tell from web.
func planFixture() (sk sinkKey, web, moved, twin exposure) {
	p := Port{Protocol: TCP, ContainerPort: 80, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8080}
	web = exposure{Claim: Key{Source: "docker", ID: "web"}, Port: p}
	moved = web
	moved.ConnectAddrs = []ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}
	twin = web
	twin.Claim = Key{Source: "kubernetes", ID: "default/web"}
	twin.Port.ContainerPort = 8080
	return byAddr(p), web, moved, twin
}

func TestPlanStep(t *testing.T) {
	sk, web, moved, twin := planFixture()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	due, later := now.Add(-time.Second), now.Add(time.Second)
	retrying := func(next time.Time, granted bool) *portFailure {
		return &portFailure{exp: web, err: "address in use", attempt: 2, next: next, granted: granted, since: due, at: due}
	}
	refused := func(e exposure) *portFailure {
		return &portFailure{exp: e, err: "refused", permanent: true, since: due, at: due}
	}
	wanted := func(in planInput) planInput { in.want, in.wanted = web, true; return in }
	held := func(in planInput, e exposure) planInput { in.acked, in.held = e, true; return in }
	base := planInput{key: sk, now: now}

	tests := []struct {
		name        string
		in          planInput
		remove, add *exposure
		eff         planEffects
	}{
		{name: "wanted and held the same: nothing", in: held(wanted(base), web),
			eff: planEffects{dropFailure: true, dropQueuedAt: true}},
		{name: "wanted and held by another claim the peer cannot tell apart: nothing", in: held(wanted(base), twin),
			eff: planEffects{dropFailure: true, dropQueuedAt: true}},
		{name: "wanted and held the same after the first reconcile: no longer inherited", in: func() planInput {
			in := held(wanted(base), web)
			in.inherited, in.synced = true, true
			return in
		}(), eff: planEffects{dropFailure: true, dropQueuedAt: true, dropInherited: true}},
		{name: "wanted and held the same but forced: add again", in: func() planInput {
			in := held(wanted(base), web)
			in.forced = true
			return in
		}(), add: &web},
		{name: "wanted and held differently: remove then add", in: held(wanted(base), moved),
			remove: &moved, add: &web},
		{name: "wanted only: add", in: wanted(base), add: &web},
		{name: "wanted only, held by another party: nothing", in: func() planInput {
			in := wanted(base)
			in.foreign = true
			in.failure = retrying(due, true)
			in.failure.permanent = true
			return in
		}(), eff: planEffects{dropFailure: true, dropQueuedAt: true}},
		{name: "wanted only, refused for good as it is: nothing", in: func() planInput {
			in := wanted(base)
			in.failure = refused(web)
			return in
		}()},
		{name: "wanted only, refused for good as it was: add", in: func() planInput {
			in := wanted(base)
			in.failure = refused(moved)
			return in
		}(), add: &web},
		{name: "held only: remove", in: held(base, moved), remove: &moved},
		{name: "held only, inherited, its source unsynced: wait", in: func() planInput {
			in := held(base, moved)
			in.inherited, in.unsynced = true, true
			return in
		}()},
		{name: "held only, inherited, its source unsynced, after the first reconcile: remove", in: func() planInput {
			in := held(base, moved)
			in.inherited, in.unsynced, in.synced = true, true, true
			return in
		}(), remove: &moved},
		{name: "held only, not inherited, its source unsynced: remove", in: func() planInput {
			in := held(base, moved)
			in.unsynced = true
			return in
		}(), remove: &moved},
		{name: "failing, not due: nothing", in: func() planInput {
			in := wanted(base)
			in.failure = retrying(later, false)
			return in
		}(), eff: planEffects{unidle: true}},
		{name: "failing, due, budget not asked: ask it", in: func() planInput {
			in := wanted(base)
			in.failure = retrying(due, false)
			return in
		}(), eff: planEffects{unidle: true, askBudget: true}},
		{name: "failing, due, no token: nothing, over budget", in: func() planInput {
			in := wanted(base)
			in.failure = retrying(due, false)
			in.budget = budgetDenied
			return in
		}(), eff: planEffects{unidle: true, overBudget: true}},
		{name: "failing, due, token taken: add, granted", in: func() planInput {
			in := wanted(base)
			in.failure = retrying(due, false)
			in.budget = budgetGranted
			return in
		}(), add: &web, eff: planEffects{unidle: true, grant: true}},
		{name: "failing, due, granted before: add without asking", in: func() planInput {
			in := wanted(base)
			in.failure = retrying(due, true)
			return in
		}(), add: &web, eff: planEffects{unidle: true}},
		{name: "failing, due, token taken, held the same now: nothing, failure dropped", in: func() planInput {
			in := held(wanted(base), web)
			in.failure = retrying(due, false)
			in.budget = budgetGranted
			return in
		}(), eff: planEffects{unidle: true, grant: true, dropFailure: true, dropQueuedAt: true}},
		{name: "failing, held only, due and granted: remove", in: func() planInput {
			in := held(base, moved)
			in.failure = retrying(due, true)
			return in
		}(), remove: &moved, eff: planEffects{unidle: true}},
		{name: "failing, neither wanted nor held: idle", in: func() planInput {
			in := base
			in.failure = retrying(due, false)
			in.forced = true
			return in
		}(), eff: planEffects{idle: true, dropForced: true, dropQueuedAt: true}},
		{name: "neither wanted nor held: clean up", in: base,
			eff: planEffects{dropFailure: true, dropForced: true, dropQueuedAt: true}},
		{name: "neither wanted nor held, refused for good: clean up", in: func() planInput {
			in := base
			in.failure = refused(web)
			return in
		}(), eff: planEffects{dropFailure: true, dropForced: true, dropQueuedAt: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before portFailure
			if tt.in.failure != nil {
				before = *tt.in.failure
			}
			st, eff := planStep(tt.in)
			if eff != tt.eff {
				t.Errorf("effects %+v, want %+v", eff, tt.eff)
			}
			if tt.remove == nil && tt.add == nil {
				if st != (step{}) || st.needed() {
					t.Errorf("step %+v, want none", st)
				}
			} else {
				if st.key != sk || !st.needed() {
					t.Errorf("step for %v (needed %t), want one for %v", st.key, st.needed(), sk)
				}
				if !reflect.DeepEqual(st.remove, tt.remove) {
					t.Errorf("remove %+v, want %+v", st.remove, tt.remove)
				}
				if !reflect.DeepEqual(st.add, tt.add) {
					t.Errorf("add %+v, want %+v", st.add, tt.add)
				}
			}
			if tt.in.failure != nil && !reflect.DeepEqual(*tt.in.failure, before) {
				t.Errorf("planStep changed the failure: %+v, was %+v", *tt.in.failure, before)
			}
		})
	}
}

// nopSink takes every change.
type nopSink struct{}

func (nopSink) Send(context.Context, Change) error { return nil }

// TestPlanAppliesEffectsAndSpendsOneTokenPerRetry checks the method
// around planStep: a due retry takes one token of the budget, once (a
// second plan of the same key, as the check before sending does, takes
// none), a due retry with no token left is held back, and the changes
// of state planStep returns are made.
func TestPlanAppliesEffectsAndSpendsOneTokenPerRetry(t *testing.T) {
	r := NewRouter(RouterConfig{RetryRate: 1, RetryBurst: 1})
	w := newSinkWorker("p", nopSink{}, func(Key) bool { return true }, r.log)
	r.workers = append(r.workers, w)
	now := time.Now()
	due := now.Add(-time.Second)
	port := func(n uint16) Port {
		return Port{Protocol: TCP, ContainerPort: n, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: n}
	}
	m := Mapping{Key: Key{Source: "src", ID: "m"}, Ports: []Port{port(1), port(2), port(3)}}
	r.ledger.update(m.Key, Mapping{}, m)
	one, two, three := byAddr(port(1)), byAddr(port(2)), byAddr(port(3))
	for _, sk := range []sinkKey{one, two} {
		w.failing[sk] = &portFailure{err: "address in use", attempt: 1, next: due, since: due, at: due}
		w.queuedAt[sk] = due
	}
	f1, f2 := w.failing[one], w.failing[two]
	f2.idle = true

	r.mu.Lock()
	defer r.mu.Unlock()
	st, ok := r.plan(w, one, now)
	if !ok || st.add == nil || st.add.Port != port(1) || st.remove != nil {
		t.Fatalf("first due retry: step %+v (%t), want an add of %v", st, ok, port(1))
	}
	if !f1.granted || w.retries.tokens != 0 {
		t.Fatalf("first due retry: granted %t, %v tokens left, want granted with none left", f1.granted, w.retries.tokens)
	}
	if st, ok := r.plan(w, one, now); !ok || st.add == nil {
		t.Fatalf("second plan of a granted retry: step %+v (%t), want the add again", st, ok)
	}
	if st, ok := r.plan(w, two, now); ok {
		t.Fatalf("due retry with no token: step %+v, want none", st)
	}
	if f2.granted || f2.idle || !w.overBudget {
		t.Fatalf("due retry with no token: granted %t, idle %t, over budget %t; want false, false, true", f2.granted, f2.idle, w.overBudget)
	}

	// Held as wanted: the failure and the time it was queued go, and,
	// once the first reconcile ran, it is no longer inherited.
	w.acked[three] = exposure{Claim: m.Key, Port: port(3)}
	w.inherited[three] = true
	w.failing[three] = &portFailure{err: "refused", permanent: true}
	w.queuedAt[three] = due
	w.synced = true
	if st, ok := r.plan(w, three, now); ok {
		t.Fatalf("held as wanted: step %+v, want none", st)
	}
	if w.failing[three] != nil || w.inherited[three] {
		t.Errorf("held as wanted: failing %v, inherited %t; want both gone", w.failing[three], w.inherited[three])
	}
	if _, ok := w.queuedAt[three]; ok {
		t.Error("held as wanted: still has the time it was queued")
	}

	// Gone while refused: the failure stays, idle, and forced goes.
	r.ledger.update(m.Key, m, Mapping{})
	w.forced[one] = true
	if st, ok := r.plan(w, one, now); ok {
		t.Fatalf("gone while refused: step %+v, want none", st)
	}
	if w.failing[one] != f1 || !f1.idle || w.forced[one] {
		t.Errorf("gone while refused: failure %p (was %p), idle %t, forced %t; want it kept, idle, not forced", w.failing[one], f1, f1.idle, w.forced[one])
	}
	if _, ok := w.queuedAt[one]; ok {
		t.Error("gone while refused: still has the time it was queued")
	}
}

// TestRetryBudgetCountsTimeOnce takes tokens with times that go back and
// forth, as a batch planned before a later count does: the tokens given
// out never exceed the burst and the rate over the time that passed.
func TestRetryBudgetCountsTimeOnce(t *testing.T) {
	var b retryBudget
	start := time.Now()
	const rate, burst = 10.0, 5
	got := b.take(start, 100, rate, burst)
	for i := 1; i <= 100; i++ {
		later := start.Add(time.Duration(i) * 100 * time.Millisecond)
		got += b.take(later, 100, rate, burst)
		got += b.take(later.Add(-50*time.Millisecond), 100, rate, burst) // an older now
	}
	// 10 s at 10 a second, and the burst.
	if limit := burst + int(rate*10); got > limit {
		t.Errorf("gave out %d tokens, want at most %d", got, limit)
	}
}
