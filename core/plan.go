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

// plan decides what sk needs; the caller holds r.mu.
func (r *Router) plan(w *sinkWorker, sk sinkKey, now time.Time) (step, bool) {
	c, wanted := r.want(w, sk)
	a, had := w.acked[sk]
	if f := w.failing[sk]; f != nil && !f.permanent {
		if !wanted && !had {
			// The port went while refused. Its refusal is kept a while,
			// so that a port that comes straight back (a source that
			// loses and finds it again) is a retry, not a first attempt.
			f.idle = true
			delete(w.forced, sk)
			delete(w.queuedAt, sk)
			return step{}, false
		}
		f.idle = false
		if f.next.After(now) {
			return step{}, false // its retry timer brings it back
		}
		// A retry, whoever queued it (a reconcile queues every port the
		// peer lacks), is let through by the budget.
		if !f.granted {
			if w.retries.take(now, 1, r.cfg.RetryRate, r.cfg.RetryBurst) == 0 {
				w.overBudget = true
				return step{}, false
			}
			f.granted = true
		}
	}
	st := step{key: sk}
	switch {
	case wanted && had:
		if w.synced {
			delete(w.inherited, sk) // a source reports it: it is simply held now
		}
		e := c.exposure()
		if a.same(e) {
			if !w.forced[sk] {
				delete(w.failing, sk)
				delete(w.queuedAt, sk)
				return step{}, false
			}
		} else {
			st.remove = &a
		}
		st.add = &e
	case wanted:
		if _, other := w.foreign[sk]; other {
			delete(w.failing, sk)
			delete(w.queuedAt, sk)
			return step{}, false
		}
		e := c.exposure()
		if f := w.failing[sk]; f != nil && f.permanent && f.exp.same(e) {
			return step{}, false // refused for good until the port changes
		}
		st.add = &e
	case had:
		if _, waiting := r.unsynced[a.Claim.Source]; waiting && w.inherited[sk] && !w.synced {
			return step{}, false // its source may still report it
		}
		st.remove = &a
	default:
		delete(w.failing, sk)
		delete(w.forced, sk)
		delete(w.queuedAt, sk)
		return step{}, false
	}
	return st, true
}
