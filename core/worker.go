package core

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"go.uber.org/zap"
)

// batchSize bounds the ports one round of a worker plans, so that a large
// change is recorded and delivered in steps and status stays fresh.
const batchSize = 256

// sinkWorker delivers the claims to one sink, port by port. Fields marked
// "mu" are guarded by Router.mu; the others belong to the run goroutine
// (and to drain, once run has returned).
type sinkWorker struct {
	name   string
	sink   Sink
	lister Lister          // nil when the peer cannot be listed
	filter PortFilter      // nil when the peer takes every port
	back   <-chan struct{} // the sink's PeerBack; nil when it has none
	keying PeerKeying
	accept func(Key) bool
	log    *zap.Logger
	wake   chan struct{}
	record *record // nil without a state directory

	dirty       keyQueue[sinkKey]        // mu: keys to look at
	resync      bool                     // mu: a reconcile is due
	synced      bool                     // mu: the first full reconcile ran, so inherited leftovers may go (those of a source that has reported may go before)
	stats       SinkStatus               // mu
	acked       map[sinkKey]exposure     // mu: what the peer holds from this agent (the ownership record)
	inherited   map[sinkKey]bool         // mu: acked entries read from the record, not yet seen this run
	foreign     map[sinkKey]foreignHold  // mu: ports the peer holds for other parties
	failing     map[sinkKey]*portFailure // mu: ports the peer refused, with their retry schedule
	forced      map[sinkKey]bool         // mu: keys to add again although acked (the peer lost them)
	recordKeys  map[sinkKey]struct{}     // mu: keys whose acked entry may differ from the record's
	recordDirty bool                     // mu: acked changed in ways recordKeys does not say (the drain): compare it whole
	queuedAt    map[sinkKey]time.Time    // mu: when a source's change first queued each key

	retries    retryBudget // mu: what retries of refused ports may still cost
	overBudget bool        // mu: retries are due that the budget held back

	down      bool       // the last failure was ErrPeerDown
	recordOps []recordOp // reused between writes of the record
}

// foreignHold is a port the peer holds for another party.
type foreignHold struct {
	target string
	same   bool // with the target this agent would use: the port works
}

// portFailure is a port the peer refused.
type portFailure struct {
	exp       exposure
	err       string
	attempt   int
	next      time.Time // zero when permanent
	permanent bool
	since     time.Time
	granted   bool      // the retry budget let its next attempt through
	idle      bool      // no longer wanted: kept for keepRefusal after at
	at        time.Time // of the last refusal
}

// keepRefusal is how long the refusal of a port no longer wanted is kept.
const keepRefusal = 30 * time.Second

func newSinkWorker(name string, s Sink, accept func(Key) bool, log *zap.Logger) *sinkWorker {
	w := &sinkWorker{
		name:       name,
		sink:       s,
		accept:     accept,
		log:        log.With(zap.String("sink", name)),
		wake:       make(chan struct{}, 1),
		acked:      map[sinkKey]exposure{},
		inherited:  map[sinkKey]bool{},
		foreign:    map[sinkKey]foreignHold{},
		failing:    map[sinkKey]*portFailure{},
		forced:     map[sinkKey]bool{},
		queuedAt:   map[sinkKey]time.Time{},
		recordKeys: map[sinkKey]struct{}{},
	}
	w.lister, _ = s.(Lister)
	w.filter, _ = s.(PortFilter)
	if n, ok := s.(PeerBackNotifier); ok {
		w.back = n.PeerBack()
	}
	if k, ok := s.(Keyer); ok {
		w.keying = k.PeerKeying()
	}
	return w
}

func (w *sinkWorker) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// keyOf is the key of p at the granularity of the sink's peer.
func (w *sinkWorker) keyOf(p Port) sinkKey {
	if w.keying == ByPort {
		return sinkKey{proto: p.Protocol, port: p.HostPort}
	}
	return sinkKey{p.Protocol, hostAddr(p), p.HostPort}
}

func (w *sinkWorker) supports(p Port) error {
	if w.filter == nil {
		return nil
	}
	return w.filter.Supports(p)
}

// takes reports whether c may go to this sink.
func (w *sinkWorker) takes(c claim) bool { return w.accept(c.key) && w.supports(c.port) == nil }

// loadRecord reads the ownership record into acked; Run calls it before
// the worker starts.
func (w *sinkWorker) loadRecord() {
	if w.record == nil {
		return
	}
	es, err := w.record.load(w.keyOf, w.log)
	if err != nil {
		w.log.Warn("ignoring the ownership record; ports a previous run left on this sink cannot be removed", zap.Error(err))
		return
	}
	for _, e := range es {
		sk := w.keyOf(e.Port)
		w.acked[sk] = e
		w.inherited[sk] = true
	}
	if len(es) > 0 {
		w.log.Info("ownership record read", zap.Int("ports", len(es)), zap.String("path", w.record.path))
	}
}

func (w *sinkWorker) run(ctx context.Context, r *Router, syncGo <-chan struct{}) {
	if w.lister != nil {
		// Look at the peer before the first add, so that ports other
		// parties hold are known and never taken for this agent's.
		r.requestResync(w)
	}
	attempt := 0
	for ctx.Err() == nil {
		r.mu.Lock()
		resync := w.resync
		w.resync = false
		r.pushDue(w, time.Now())
		r.mu.Unlock()
		var err error
		progressed := false
		if resync {
			err = w.reconcile(ctx, r)
			progressed = err == nil
		}
		if err == nil {
			var p bool
			p, err = w.deliverBatch(ctx, r)
			progressed = progressed || p
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			r.mu.Lock()
			if resync {
				w.resync = true
			}
			w.stats.PeerDown = true
			w.noteError(err)
			r.notify()
			r.mu.Unlock()
			w.down = true
			delay := r.cfg.Backoff.Delay(attempt)
			attempt++
			w.log.Warn("peer unreachable; will retry", zap.Error(err), zap.Duration("retry_in", delay))
			live, back := w.sleepDown(ctx, delay)
			if !live {
				return
			}
			if back {
				attempt = 0 // the peer answers: start the backoff over
			}
			if w.lister != nil {
				r.requestResync(w) // listing is the probe, and the replay
			}
			continue
		}
		if w.down && progressed {
			w.down = false
			attempt = 0
			r.mu.Lock()
			w.stats.PeerDown = false
			r.notify()
			if w.lister == nil || !resync {
				w.log.Info("peer reachable again; replaying every port")
				w.resync = true
			} else {
				w.log.Info("peer reachable again; reconciled")
			}
			r.mu.Unlock()
			continue
		}
		r.mu.Lock()
		busy := w.resync || w.dirty.len() > 0
		next := r.nextRetry(w)
		r.mu.Unlock()
		if busy {
			continue
		}
		if w.wait(ctx, r, next, &syncGo) {
			return
		}
	}
}

// sleepDown waits delay after the peer was unreachable, or less when the
// sink says its peer answers again. It reports whether ctx is still live,
// and whether the sink's word ended the wait.
func (w *sinkWorker) sleepDown(ctx context.Context, delay time.Duration) (live, back bool) {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false, false
	case <-t.C:
		return true, false
	case <-w.back:
		w.log.Info("peer answers again; retrying before the backoff ends")
		return true, true
	}
}

// wait blocks until there is work: a signal, a retry that is due, or the
// initial sync. It reports whether ctx is done.
func (w *sinkWorker) wait(ctx context.Context, r *Router, next time.Time, syncGo *<-chan struct{}) bool {
	var retry <-chan time.Time
	if !next.IsZero() {
		t := time.NewTimer(time.Until(next))
		defer t.Stop()
		retry = t.C
	}
	select {
	case <-ctx.Done():
		return true
	case <-w.wake:
	case <-retry:
	case <-*syncGo:
		*syncGo = nil
		r.mu.Lock()
		w.synced = true
		if w.lister != nil {
			w.resync = true
		} else {
			// The peer cannot be listed: add again what a previous run
			// left (it may have restarted since), and remove what no
			// source wants any more.
			for _, sk := range slices.SortedFunc(maps.Keys(w.inherited), compareSinkKeys) {
				w.forced[sk] = true
				w.dirty.push(sk)
			}
		}
		r.mu.Unlock()
	}
	return false
}

// noteError records err as the sink's last error; the caller holds r.mu.
func (w *sinkWorker) noteError(err error) {
	w.stats.LastError = err.Error()
	w.stats.LastErrorAt = time.Now()
}

// reconcile looks at the whole state again: through List, it learns which
// ports the peer holds, drops from the record what the peer lost, notes
// what other parties hold, and queues every key; without List it adds
// every held port again (the peer may have restarted empty).
func (w *sinkWorker) reconcile(ctx context.Context, r *Router) error {
	if w.lister == nil {
		r.mu.Lock()
		defer r.mu.Unlock()
		for sk := range w.acked {
			w.forced[sk] = true
		}
		r.pushAll(w)
		w.stats.Syncs++
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, r.cfg.SendTimeout)
	held, err := w.lister.List(lctx)
	cancel()
	if err != nil {
		if ctx.Err() == nil && !errors.Is(err, ErrPeerDown) {
			err = PeerDown(err)
		}
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	peer := make(map[sinkKey]Held, len(held))
	for _, h := range held {
		sk := w.keyOf(h.Port)
		if _, dup := peer[sk]; !dup {
			peer[sk] = h
		}
	}
	lost := 0
	for sk, a := range w.acked {
		h, ok := peer[sk]
		if ok && h.Matches && hostAddr(h.Port) == hostAddr(a.Port) {
			continue
		}
		delete(w.acked, sk)
		delete(w.inherited, sk)
		w.noteRecord(sk)
		w.dirty.push(sk)
		lost++
	}
	foreign := make(map[sinkKey]foreignHold, len(w.foreign))
	for sk, h := range peer {
		if _, ours := w.acked[sk]; !ours {
			foreign[sk] = foreignHold{target: h.Target, same: h.Matches}
		}
	}
	for sk, f := range w.foreign {
		if foreign[sk] != f {
			w.dirty.push(sk) // another party released or changed it
		}
	}
	w.foreign = foreign
	if lost > 0 {
		w.log.Info("peer no longer holds ports this agent exposed; exposing them again", zap.Int("ports", lost))
	}
	// Queue only what may need a change: wanted ports the peer does not
	// hold for anyone, and held ones a run before this left.
	r.pushUnheld(w)
	for sk := range w.inherited {
		w.dirty.push(sk)
	}
	w.stats.Syncs++
	r.notify()
	return nil
}

// deliverBatch plans and sends up to batchSize keys. It returns an error
// only when the peer is unreachable (or ctx is done); the keys not done go
// back to the queue.
func (w *sinkWorker) deliverBatch(ctx context.Context, r *Router) (bool, error) {
	now := time.Now()
	r.mu.Lock()
	var plan []step
	adds := false
	for len(plan) < batchSize {
		sk, ok := w.dirty.pop()
		if !ok {
			break
		}
		if st, ok := r.plan(w, sk, now); ok {
			plan = append(plan, st)
			adds = adds || st.add != nil
		}
	}
	var intent []recordOp
	if w.record != nil && adds {
		// Record the adds before sending them, so that an agent killed
		// in between still knows them for its own; the flush after the
		// batch records what the peer took instead.
		intent = w.recordOps[:0]
		for _, st := range plan {
			if st.add != nil {
				intent = append(intent, recordOp{key: st.key, exp: *st.add, held: true})
				w.noteRecord(st.key)
			}
		}
	}
	r.mu.Unlock()
	if len(plan) == 0 {
		return false, nil
	}
	if intent != nil {
		w.recordOps = intent
		w.writeRecord(intent, false)
	}
	defer w.flushRecord(r)
	for i, st := range plan {
		// What a key needs may have changed while earlier keys were sent;
		// a key whose need changed waits for the next round, whose record
		// covers it.
		r.mu.Lock()
		fresh, ok := r.plan(w, st.key, time.Now())
		if ok && !fresh.sameAs(st) {
			w.dirty.push(st.key)
			ok = false
		}
		r.mu.Unlock()
		if !ok {
			continue
		}
		if err := w.execute(ctx, r, st); err != nil {
			r.mu.Lock()
			for _, rest := range plan[i:] {
				w.dirty.push(rest.key)
			}
			r.mu.Unlock()
			return i > 0, err
		}
	}
	return true, nil
}

// execute sends st; it returns an error only when the peer is unreachable
// or ctx is done.
func (w *sinkWorker) execute(ctx context.Context, r *Router, st step) error {
	if st.remove != nil {
		err := w.send(ctx, r, st.remove.change(true))
		r.mu.Lock()
		switch {
		case err == nil || errors.Is(err, ErrPermanent):
			if err != nil {
				w.stats.Rejected++
				w.noteError(err)
				w.log.Warn("peer refused to remove a port; no longer tracked", zap.Stringer("port", st.remove.Port), zap.Error(err))
			}
			delete(w.acked, st.key)
			delete(w.inherited, st.key)
			delete(w.forced, st.key)
			w.noteRecord(st.key)
			if st.add == nil {
				r.delivered(w, st.key, *st.remove, true)
			}
			r.notify()
		case ctx.Err() != nil || errors.Is(err, ErrPeerDown):
			r.mu.Unlock()
			return err
		default:
			w.fail(r, st.key, *st.remove, err)
			r.mu.Unlock()
			return nil
		}
		r.mu.Unlock()
	}
	if st.add == nil {
		return nil
	}
	err := w.send(ctx, r, st.add.change(false))
	r.mu.Lock()
	defer r.mu.Unlock()
	defer r.notify()
	switch {
	case err == nil:
		w.acked[st.key] = *st.add
		delete(w.inherited, st.key)
		delete(w.forced, st.key)
		w.noteRecord(st.key)
		r.delivered(w, st.key, *st.add, false)
		if f := w.failing[st.key]; f != nil {
			w.log.Info("port exposed after failing", zap.Stringer("port", st.add.Port), zap.Duration("after", time.Since(f.since)))
			delete(w.failing, st.key)
		}
	case ctx.Err() != nil:
		// The add may have reached the peer: keep it as held, so that the
		// drain or the next run removes it.
		w.acked[st.key] = *st.add
		w.noteRecord(st.key)
		return err
	case errors.Is(err, errSendTimeout), errors.Is(err, ErrPeerDown):
		// The add may have reached the peer (the answer was lost): count
		// it as held, so that it is never taken for another party's and
		// the drain or the next run removes it, and check it again: the
		// reconcile lists it, or a plain peer gets it again.
		w.acked[st.key] = *st.add
		w.noteRecord(st.key)
		if w.lister != nil {
			w.resync = true
		} else {
			w.forced[st.key] = true
		}
		if errors.Is(err, ErrPeerDown) {
			return err
		}
		w.fail(r, st.key, *st.add, err)
	case errors.Is(err, ErrHeldElsewhere), errors.Is(err, ErrConflict):
		w.foreign[st.key] = foreignHold{target: err.Error(), same: errors.Is(err, ErrHeldElsewhere)}
		delete(w.failing, st.key)
		w.log.Info("port held by another party; not taken", zap.Stringer("port", st.add.Port), zap.Error(err))
	case errors.Is(err, ErrPermanent):
		w.stats.Rejected++
		w.noteError(err)
		w.failing[st.key] = &portFailure{exp: *st.add, err: err.Error(), permanent: true, since: time.Now()}
		w.log.Warn("peer refused a port; not retrying until it changes", zap.Stringer("port", st.add.Port), zap.Error(err))
	default:
		w.fail(r, st.key, *st.add, err)
	}
	return nil
}

// fail schedules a retry of sk on its own backoff; the caller holds r.mu.
func (w *sinkWorker) fail(r *Router, sk sinkKey, e exposure, err error) {
	r.notify()
	w.stats.Failures++
	w.noteError(err)
	f := w.failing[sk]
	if f == nil || f.permanent {
		f = &portFailure{since: time.Now()}
		w.failing[sk] = f
	}
	first := f.attempt == 0 || f.err != err.Error()
	f.exp, f.err, f.granted, f.at = e, err.Error(), false, time.Now()
	delay := r.cfg.PortBackoff.Delay(f.attempt)
	f.attempt++
	f.next = time.Now().Add(delay)
	log := w.log.Debug
	if first {
		log = w.log.Warn
	}
	log("peer refused a port; will retry it", zap.Stringer("port", e.Port), zap.Error(err), zap.Duration("retry_in", delay))
}

// errSendTimeout marks a change that ran out of time: the peer may have
// applied it.
var errSendTimeout = errors.New("no answer within the send timeout")

// send delivers one change within the send timeout.
func (w *sinkWorker) send(ctx context.Context, r *Router, c Change) error {
	sctx, cancel := context.WithTimeout(ctx, r.cfg.SendTimeout)
	defer cancel()
	err := w.sink.Send(sctx, c)
	if err != nil && sctx.Err() != nil && ctx.Err() == nil {
		err = fmt.Errorf("%w: %w", errSendTimeout, err)
	}
	if err == nil {
		r.mu.Lock()
		w.stats.Delivered++
		r.mu.Unlock()
		w.log.Debug("delivered", zap.Stringer("change", c))
	}
	return err
}

// noteRecord marks sk's entry in acked for the next write of the record;
// the caller holds r.mu.
func (w *sinkWorker) noteRecord(sk sinkKey) {
	if w.record != nil {
		w.recordKeys[sk] = struct{}{}
	}
}

// flushRecord writes to the record what changed in acked: the entries of
// the keys noted since the last write (all of acked after the drain). Only
// those are looked at under r.mu; the record compares and writes them
// without it.
func (w *sinkWorker) flushRecord(r *Router) {
	if w.record == nil {
		return
	}
	r.mu.Lock()
	full := w.recordDirty
	if !full && len(w.recordKeys) == 0 && !w.record.stale {
		r.mu.Unlock()
		return
	}
	ops := w.recordOps[:0]
	if full {
		for sk, e := range w.acked {
			ops = append(ops, recordOp{key: sk, exp: e, held: true})
		}
	} else {
		for sk := range w.recordKeys {
			e, ok := w.acked[sk]
			ops = append(ops, recordOp{key: sk, exp: e, held: ok})
		}
	}
	if len(w.recordKeys) > 4*batchSize {
		w.recordKeys = map[sinkKey]struct{}{} // do not keep (and clear) a large table
	} else {
		clear(w.recordKeys)
	}
	w.recordDirty = false
	r.mu.Unlock()
	w.recordOps = ops
	w.writeRecord(ops, full)
}

// writeRecord records ops; a record that could not be written is
// rewritten whole at the next write.
//
// A failure is logged once, when the record starts failing; while it
// fails, the record tries again at most every failedWriteWait, and says
// when a write works again.
func (w *sinkWorker) writeRecord(ops []recordOp, full bool) {
	err := w.record.apply(ops, full)
	clear(ops) // drop the references to claims
	rec := w.record
	switch {
	case errors.Is(err, errWritePaused):
	case err != nil:
		if !rec.failing {
			w.log.Warn("cannot write the ownership record; keeping it in memory and trying again every few seconds (after a restart, ports exposed meanwhile cannot be told apart from another party's)", zap.Error(err), zap.Duration("retry_every", failedWriteWait))
		}
		rec.failing, rec.retryAt = true, time.Now().Add(failedWriteWait)
	case rec.failing:
		rec.failing = false
		w.log.Info("ownership record written again", zap.String("path", rec.path))
	}
}
