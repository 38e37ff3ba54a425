package core

import "time"

// step is what one key needs: a remove, an add, or both (in that order).
type step struct {
	key         sinkKey
	remove, add *exposure
}

func (s step) sameAs(o step) bool {
	same := func(a, b *exposure) bool {
		return (a == nil) == (b == nil) && (a == nil || a.same(*b) && a.Claim == b.Claim && a.Port == b.Port)
	}
	return s.key == o.key && same(s.remove, o.remove) && same(s.add, o.add)
}

// want returns the claim the sink should hold for sk: the earliest one it
// takes.
func (r *Router) want(w *sinkWorker, sk sinkKey) (claim, bool) {
	for _, c := range r.ledger.byPort[portKey{sk.proto, sk.port}] {
		if (w.keying == ByPort || hostAddr(c.port) == sk.ip) && w.takes(c) {
			return c, true
		}
	}
	return claim{}, false
}

// planInput is what planStep knows of one key of one sink: the state the
// router and the sink's worker keep for it, gathered under Router.mu.
type planInput struct {
	key sinkKey
	now time.Time

	want   exposure // what the sink should hold, when wanted
	wanted bool     // a claim the sink takes wants the key
	acked  exposure // what the peer holds from this agent, when held
	held   bool     // the peer holds the key from this agent

	failure   *portFailure // the peer's refusal of the key, nil when none; planStep only reads it
	foreign   bool         // the peer holds the key for another party
	forced    bool         // to be added again although held (the peer lost it)
	inherited bool         // held since a previous run and not yet seen in this one
	synced    bool         // the worker's first full reconcile ran
	unsynced  bool         // the source of acked's claim has yet to send its first snapshot

	budget budgetAnswer // what the retry budget said of a retry that is due
}

// budgetAnswer is what the retry budget said of a key's due retry.
type budgetAnswer int

const (
	budgetUnasked budgetAnswer = iota // not asked: planStep asks for it with askBudget
	budgetGranted                     // a token was taken for the retry
	budgetDenied                      // no token was left
)

// planEffects are the changes of state that come with a planned step,
// for the caller of planStep to apply.
type planEffects struct {
	// askBudget: the key is a due retry that the budget has not let
	// through yet; take a token and plan it again with the answer.
	askBudget bool
	// overBudget: the budget held the retry back.
	overBudget bool
	// grant: a token was taken for the failure's retry (its granted).
	grant bool
	// idle and unidle set the failure's idle: the port went while refused
	// (its refusal is kept a while, so that a port that comes straight
	// back is a retry, not a first attempt), or it is wanted again.
	idle, unidle bool

	dropFailure   bool // delete the key's failure
	dropForced    bool // delete the key's forced
	dropQueuedAt  bool // delete the time a source's change queued the key
	dropInherited bool // the key is simply held now: a source reports it
}

// needed reports whether s sends anything.
func (s step) needed() bool { return s.remove != nil || s.add != nil }

// planStep decides what a key needs from what in says of it, and the
// changes of state that come with the decision. It changes nothing.
func planStep(in planInput) (step, planEffects) {
	var eff planEffects
	if f := in.failure; f != nil && !f.permanent {
		if !in.wanted && !in.held {
			return step{}, planEffects{idle: true, dropForced: true, dropQueuedAt: true}
		}
		eff.unidle = true
		if f.next.After(in.now) {
			return step{}, eff // its retry timer brings it back
		}
		// A retry, whoever queued it (a reconcile queues every port the
		// peer lacks), is let through by the budget.
		if !f.granted {
			switch in.budget {
			case budgetUnasked:
				eff.askBudget = true
				return step{}, eff
			case budgetDenied:
				eff.overBudget = true
				return step{}, eff
			}
			eff.grant = true
		}
	}
	st := step{key: in.key}
	switch {
	case in.wanted && in.held:
		eff.dropInherited = in.synced
		e, a := in.want, in.acked
		if a.same(e) {
			if !in.forced {
				eff.dropFailure, eff.dropQueuedAt = true, true
				return step{}, eff
			}
		} else {
			st.remove = &a
		}
		st.add = &e
	case in.wanted:
		if in.foreign {
			eff.dropFailure, eff.dropQueuedAt = true, true
			return step{}, eff
		}
		if f := in.failure; f != nil && f.permanent && f.exp.same(in.want) {
			return step{}, eff // refused for good until the port changes
		}
		e := in.want
		st.add = &e
	case in.held:
		if in.unsynced && in.inherited && !in.synced {
			return step{}, eff // its source may still report it
		}
		a := in.acked
		st.remove = &a
	default:
		eff.dropFailure, eff.dropForced, eff.dropQueuedAt = true, true, true
		return step{}, eff
	}
	return st, eff
}

// plan decides what sk needs with planStep and applies the changes of
// state that come with it, asking the retry budget for a token when
// planStep does; the caller holds r.mu.
func (r *Router) plan(w *sinkWorker, sk sinkKey, now time.Time) (step, bool) {
	in := planInput{
		key:       sk,
		now:       now,
		failure:   w.failing[sk],
		forced:    w.forced[sk],
		inherited: w.inherited[sk],
		synced:    w.synced,
	}
	var c claim
	if c, in.wanted = r.want(w, sk); in.wanted {
		in.want = c.exposure()
	}
	if in.acked, in.held = w.acked[sk]; in.held {
		_, in.unsynced = r.unsynced[in.acked.Claim.Source]
	}
	_, in.foreign = w.foreign[sk]
	st, eff := planStep(in)
	if eff.askBudget {
		in.budget = budgetDenied
		if w.retries.take(now, 1, r.cfg.RetryRate, r.cfg.RetryBurst) > 0 {
			in.budget = budgetGranted
		}
		st, eff = planStep(in)
	}
	if f := in.failure; f != nil {
		switch {
		case eff.idle:
			f.idle = true
		case eff.unidle:
			f.idle = false
		}
		if eff.grant {
			f.granted = true
		}
	}
	if eff.overBudget {
		w.overBudget = true
	}
	if eff.dropFailure {
		delete(w.failing, sk)
	}
	if eff.dropForced {
		delete(w.forced, sk)
	}
	if eff.dropQueuedAt {
		delete(w.queuedAt, sk)
	}
	if eff.dropInherited {
		delete(w.inherited, sk)
	}
	return st, st.needed()
}
