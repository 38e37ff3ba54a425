package core

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
)

// RouterConfig configures a Router. Zero values pick sane defaults.
type RouterConfig struct {
	// Log receives the router's log lines; nil discards them.
	Log *zap.Logger
	// Policy, when set, adjusts or refuses every port before delivery.
	Policy Policy
	// Backoff bounds retry delays while a sink's peer is unreachable and
	// for failed sources.
	Backoff Backoff
	// PortBackoff bounds retry delays of one port a peer refused (a host
	// port in use, say); it never delays other ports (default 250ms to 8s).
	PortBackoff Backoff
	// RetryRate bounds the retries of refused ports, per sink, in all:
	// at most RetryBurst at once, then RetryRate a second (defaults 20
	// and 200). Retries over it wait their turn, earliest due first; new
	// changes never wait for it. So a peer that cannot bind ten thousand
	// ports costs a bounded rate of requests, not one per port per backoff.
	RetryRate  float64
	RetryBurst int
	// StateDir, when set, holds each sink's ownership record: the ports
	// this agent exposed there, so that a restarted agent removes exactly
	// its own leftovers. Empty keeps the record in memory only. Run makes
	// it (0700) when it is missing; one that is a link, or that another
	// user owns or may write to, is not used (the record stays in memory,
	// with a warning), and neither is a file in it that is not a regular
	// file the agent's user owns and alone may write.
	StateDir string
	// SendTimeout bounds one Send or List call (default 15s).
	SendTimeout time.Duration
	// SyncGrace is how long sinks wait for every source's first snapshot
	// before removing what an earlier run left and no source reports
	// (default 10s). What an earlier run left for a source that has sent
	// its first snapshot goes at once, when that source no longer wants
	// it.
	SyncGrace time.Duration
	// Delivered, when set, is called after each port a sink took: with the
	// sink, the source of the claim, whether it was a removal, and the time
	// since the router learned of the change. It must not block.
	Delivered func(sink, source string, remove bool, latency time.Duration)
	// DrainTimeout, when positive, makes Run remove every port it exposed
	// (and only those) before it returns, spending at most this long per
	// sink. The drain runs before Run closes the sinks.
	DrainTimeout time.Duration
}

// Router keeps the desired state reported by sources, as a ledger of claims
// per host port, and delivers it to sinks port by port. Each sink has its
// own queue and worker, so a slow or unreachable sink never blocks a source
// or another sink; a port a peer refuses is retried on its own backoff, a
// sink that comes back is reconciled in full, and only ports the agent
// exposed (its ownership record says which) are ever removed.
//
// A Router owns the sinks added to it once Run starts: when Run returns, it
// closes every sink that is an io.Closer (see Sink).
type Router struct {
	cfg     RouterConfig
	log     *zap.Logger
	sources []namedSource
	workers []*sinkWorker

	mu       sync.Mutex
	running  bool
	desired  map[Key]Mapping // admitted mappings, by key
	ledger   *ledger         // the claims of desired, by host port
	refused  map[Key][]Refusal
	notes    map[Key]Note        // things sources saw that expose nothing
	watching map[string]string   // source -> how it watches, as it described itself
	unsynced map[string]struct{} // sources yet to send a first snapshot
	ready    chan struct{}       // closed once unsynced is empty
	changes  chan struct{}       // closed and replaced at every change of Status
}

type namedSource struct {
	name string
	src  Source
}

// Refusal is a port that was left out, with the reason.
type Refusal struct {
	Key    Key    `json:"key"`
	Port   Port   `json:"port"`
	Reason string `json:"reason"`
}

// NewRouter returns a Router with no sources or sinks.
func NewRouter(cfg RouterConfig) *Router {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Backoff.Initial <= 0 {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.PortBackoff.Initial <= 0 {
		cfg.PortBackoff = Backoff{Initial: 250 * time.Millisecond, Max: 8 * time.Second}
	}
	if cfg.RetryRate <= 0 {
		cfg.RetryRate = 20
	}
	if cfg.RetryBurst <= 0 {
		cfg.RetryBurst = 200
	}
	if cfg.SendTimeout <= 0 {
		cfg.SendTimeout = 15 * time.Second
	}
	if cfg.SyncGrace <= 0 {
		cfg.SyncGrace = 10 * time.Second
	}
	return &Router{
		cfg:      cfg,
		log:      cfg.Log,
		desired:  make(map[Key]Mapping),
		ledger:   newLedger(),
		refused:  make(map[Key][]Refusal),
		notes:    make(map[Key]Note),
		watching: make(map[string]string),
		unsynced: make(map[string]struct{}),
		ready:    make(chan struct{}),
		changes:  make(chan struct{}),
	}
}

// Changed returns a channel that is closed at the next change of what
// Status reports, for watchers that want to follow it without polling.
func (r *Router) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changes
}

// notify wakes the watchers of Changed; the caller holds r.mu.
func (r *Router) notify() {
	close(r.changes)
	r.changes = make(chan struct{})
}

// AddSource registers a source under name; Run runs it. It panics if called
// after Run started or with a name already in use, which are programming
// errors.
func (r *Router) AddSource(name string, s Source) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running {
		panic("core: AddSource after Run")
	}
	if slices.ContainsFunc(r.sources, func(n namedSource) bool { return n.name == name }) {
		panic(fmt.Sprintf("core: source %q added twice", name))
	}
	r.sources = append(r.sources, namedSource{name, s})
	r.unsynced[name] = struct{}{}
}

// AddSink registers a sink under name. accept, when not nil, limits the
// mappings the sink receives. Like AddSource it must precede Run.
func (r *Router) AddSink(name string, s Sink, accept func(Key) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running {
		panic("core: AddSink after Run")
	}
	if slices.ContainsFunc(r.workers, func(w *sinkWorker) bool { return w.name == name }) {
		panic(fmt.Sprintf("core: sink %q added twice", name))
	}
	if accept == nil {
		accept = func(Key) bool { return true }
	}
	w := newSinkWorker(name, s, accept, r.log)
	w.record = newRecord(r.cfg.StateDir, name)
	r.workers = append(r.workers, w)
}

// Emitter returns the Emitter through which the named source reports. Run
// passes it to registered sources; it is exported for callers that feed
// the Router from elsewhere (tests, embedders).
func (r *Router) Emitter(source string) Emitter {
	return &emitter{r: r, source: source}
}

// Run runs every source and sink worker until ctx is done, then drains if
// configured, then closes every sink that is an io.Closer, once each. It
// returns once everything it started has stopped and the sinks are closed.
func (r *Router) Run(ctx context.Context) error {
	r.mu.Lock()
	if r.running {
		r.mu.Unlock()
		return errors.New("core: Router.Run called twice")
	}
	r.running = true
	if len(r.unsynced) == 0 {
		close(r.ready)
	}
	if r.cfg.StateDir != "" {
		if err := prepareStateDir(r.cfg.StateDir); err != nil {
			r.log.Warn("ownership records kept in memory only: the state directory cannot be used (ports a previous run left cannot be removed, and a restart will not know this run's)", zap.String("dir", r.cfg.StateDir), zap.Error(err))
			for _, w := range r.workers {
				w.record = nil
			}
		}
	}
	for _, w := range r.workers {
		w.loadRecord()
	}
	r.mu.Unlock()

	var wg sync.WaitGroup
	syncGo := make(chan struct{})
	wg.Go(func() {
		t := time.NewTimer(r.cfg.SyncGrace)
		defer t.Stop()
		select {
		case <-r.ready:
		case <-t.C:
			r.log.Info("not every source reported its state in time; syncing sinks anyway",
				zap.Strings("waiting_for", r.unsyncedSources()))
		case <-ctx.Done():
		}
		close(syncGo)
	})
	for _, s := range r.sources {
		wg.Go(func() { r.runSource(ctx, s) })
	}
	for _, w := range r.workers {
		if pw, ok := w.sink.(PeerWatcher); ok {
			wg.Go(func() {
				pw.WatchPeer(ctx, func() {
					w.log.Debug("peer check asks for a reconcile")
					r.requestResync(w)
				})
			})
		}
		wg.Go(func() { w.run(ctx, r, syncGo) })
	}
	wg.Wait()
	if r.cfg.DrainTimeout > 0 {
		r.drain()
	}
	r.closeSinks()
	return nil
}

// closeSinks closes every sink that is an io.Closer, once each (a pointer
// added under more than one name is closed once), and logs what Close
// returns. Every worker and peer watcher has stopped and the drain is done,
// so no call to a sink is under way.
func (r *Router) closeSinks() {
	var closed []Sink
	for _, w := range r.workers {
		c, ok := w.sink.(io.Closer)
		if !ok || slices.ContainsFunc(closed, func(s Sink) bool { return sameSink(s, w.sink) }) {
			continue
		}
		closed = append(closed, w.sink)
		if err := c.Close(); err != nil {
			w.log.Warn("could not close the sink", zap.Error(err))
		}
	}
}

// sameSink reports whether a and b are the same pointer. Other sink values
// are not compared: == panics on a type that is not comparable.
func sameSink(a, b Sink) bool {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	return va.Kind() == reflect.Pointer && va.Type() == vb.Type() && va.Pointer() == vb.Pointer()
}

func (r *Router) unsyncedSources() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.unsynced))
}

func (r *Router) runSource(ctx context.Context, s namedSource) {
	log := r.log.With(zap.String("source", s.name))
	for attempt := 0; ; attempt++ {
		start := time.Now()
		err := s.src.Run(ctx, r.Emitter(s.name))
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			log.Info("source finished")
			return
		}
		if time.Since(start) > r.cfg.Backoff.Max {
			attempt = 0
		}
		delay := r.cfg.Backoff.Delay(attempt)
		log.Error("source failed; restarting", zap.Error(err), zap.Duration("retry_in", delay))
		if !Sleep(ctx, delay) {
			return
		}
	}
}

// Desired returns the mappings that should be exposed, sorted by key.
func (r *Router) Desired() []Mapping {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sortedDesired(func(Key) bool { return true })
}

func (r *Router) sortedDesired(accept func(Key) bool) []Mapping {
	out := make([]Mapping, 0, len(r.desired))
	for k, m := range r.desired {
		if accept(k) {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(a, b Mapping) int { return compareKeys(a.Key, b.Key) })
	return out
}

func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Source, b.Source), cmp.Compare(a.ID, b.ID))
}

// admit validates m's ports and applies the policy; it returns the ports
// that may be delivered and the ones refused.
func (r *Router) admit(m Mapping) (Mapping, []Refusal) {
	var refused []Refusal
	kept := make([]Port, 0, len(m.Ports))
	for _, p := range m.Ports {
		if err := p.Validate(); err != nil {
			refused = append(refused, Refusal{Key: m.Key, Port: p, Reason: err.Error()})
			continue
		}
		if r.cfg.Policy != nil {
			q, err := r.cfg.Policy(p)
			if err != nil {
				refused = append(refused, Refusal{Key: m.Key, Port: p, Reason: err.Error()})
				continue
			}
			p = q
		}
		kept = append(kept, p)
	}
	m.Ports = kept
	return m.Normalize(), refused
}

// set records m as desired; the caller holds r.mu.
func (r *Router) set(m Mapping) {
	if m.ID == "" {
		r.log.Error("mapping without an id ignored", zap.String("source", m.Source), zap.Any("ports", m.Ports))
		return
	}
	m, refused := r.admit(m)
	if !slices.Equal(refused, r.refused[m.Key]) {
		for _, f := range refused {
			r.log.Warn("port not exposed", zap.Stringer("key", f.Key), zap.Stringer("port", f.Port), zap.String("reason", f.Reason))
		}
	}
	if !slices.Equal(refused, r.refused[m.Key]) {
		r.notify()
	}
	if len(refused) == 0 {
		delete(r.refused, m.Key)
	} else {
		r.refused[m.Key] = refused
	}
	old, had := r.desired[m.Key]
	switch {
	case len(m.Ports) == 0:
		if had {
			delete(r.desired, m.Key)
			r.changed(m.Key, r.ledger.update(m.Key, old, Mapping{}))
		}
	case !had || !old.Equal(m):
		r.desired[m.Key] = m
		r.changed(m.Key, r.ledger.update(m.Key, old, m))
	}
}

// remove drops k from the desired state; the caller holds r.mu.
func (r *Router) remove(k Key) {
	delete(r.refused, k)
	if old, ok := r.desired[k]; ok {
		delete(r.desired, k)
		r.changed(k, r.ledger.update(k, old, Mapping{}))
	}
}

// changed queues the touched ports of k for every sink that takes k; the
// caller holds r.mu.
func (r *Router) changed(k Key, touched []Port) {
	for _, w := range r.workers {
		if !w.accept(k) {
			continue
		}
		for _, p := range touched {
			if err := w.supports(p); err != nil {
				r.logUnsupported(w, k, p, err)
				continue
			}
			sk := w.keyOf(p)
			if f := w.failing[sk]; f != nil {
				// What it wants changed: try at once. The same port
				// again (its claim went and came back) is a retry.
				if c, ok := r.want(w, sk); ok && !identical(c.exposure(), f.exp) {
					delete(w.failing, sk)
				}
			}
			if _, queued := w.queuedAt[sk]; !queued {
				w.queuedAt[sk] = time.Now()
			}
			w.dirty.push(sk)
		}
		w.signal()
	}
	r.notify()
}

// logUnsupported says once, when a claim arrives, that a sink cannot take
// its port: at debug level when the claim's own IPv4 twin (the 0.0.0.0 of
// a [::] binding, say) goes instead, as a warning otherwise. The caller
// holds r.mu.
func (r *Router) logUnsupported(w *sinkWorker, k Key, p Port, err error) {
	m, ok := r.desired[k]
	if !ok || !slices.Contains(m.Ports, p) {
		return // the claim went
	}
	twin := slices.ContainsFunc(m.Ports, func(q Port) bool {
		return q.Protocol == p.Protocol && q.HostPort == p.HostPort && q != p && w.supports(q) == nil
	})
	if twin {
		w.log.Debug("port not supported by this sink; its twin is exposed", zap.Stringer("key", k), zap.Stringer("port", p), zap.Error(err))
		return
	}
	w.log.Warn("port not exposed: not supported by this sink", zap.Stringer("key", k), zap.Stringer("port", p), zap.Error(err))
}

func (r *Router) requestResync(w *sinkWorker) {
	r.mu.Lock()
	w.resync = true
	r.mu.Unlock()
	w.signal()
}

func (r *Router) markSynced(source string) {
	if _, ok := r.unsynced[source]; !ok {
		return
	}
	delete(r.unsynced, source)
	if len(r.unsynced) == 0 && r.running {
		close(r.ready)
	}
	// What a previous run exposed for this source, and the source no
	// longer wants, may go now, without waiting for the other sources.
	for _, w := range r.workers {
		pushed := false
		for sk := range w.inherited {
			if w.acked[sk].Claim.Source == source {
				w.dirty.push(sk)
				pushed = true
			}
		}
		if pushed {
			w.signal()
		}
	}
}

// pushAll queues every key the sink holds or should hold; the caller holds
// r.mu.
func (r *Router) pushAll(w *sinkWorker) {
	for _, k := range slices.SortedFunc(maps.Keys(w.acked), compareSinkKeys) {
		w.dirty.push(k)
	}
	for _, pk := range slices.SortedFunc(maps.Keys(r.ledger.byPort), comparePortKeys) {
		for _, c := range r.ledger.byPort[pk] {
			if w.takes(c) {
				w.dirty.push(w.keyOf(c.port))
			}
		}
	}
}

// pushUnheld queues every key the sink should hold that its peer holds
// for no one; the caller holds r.mu.
func (r *Router) pushUnheld(w *sinkWorker) {
	for _, cs := range r.ledger.byPort {
		for _, c := range cs {
			if !w.takes(c) {
				continue
			}
			sk := w.keyOf(c.port)
			_, ours := w.acked[sk]
			_, other := w.foreign[sk]
			if !ours && !other {
				w.dirty.push(sk)
			}
		}
	}
}

// nextRetry is when the earliest failing port is due, or, when the retry
// budget held due ones back, when it allows one more; the caller holds
// r.mu.
func (r *Router) nextRetry(w *sinkWorker) time.Time {
	if w.overBudget {
		return w.retries.next(r.cfg.RetryRate, r.cfg.RetryBurst)
	}
	var next time.Time
	for _, f := range w.failing {
		if !f.permanent && !f.idle && (next.IsZero() || f.next.Before(next)) {
			next = f.next
		}
	}
	return next
}

// pushDue queues the failing ports whose retry is due, as many as the
// retry budget allows (which ones, when not all may go, is left to the
// map's order: every due port has the same chance each time); the caller
// holds r.mu.
func (r *Router) pushDue(w *sinkWorker, now time.Time) {
	avail := -1 // the tokens, counted at the first due port
	w.overBudget = false
	for sk, f := range w.failing {
		if f.idle {
			if now.Sub(f.at) > keepRefusal {
				delete(w.failing, sk)
			}
			continue
		}
		if f.permanent || f.next.After(now) || w.dirty.has(sk) {
			continue
		}
		if avail < 0 {
			avail = w.retries.take(now, r.cfg.RetryBurst, r.cfg.RetryRate, r.cfg.RetryBurst)
		}
		if avail == 0 {
			w.overBudget = true
			break
		}
		avail--
		f.granted = true
		w.dirty.push(sk)
	}
	if avail > 0 {
		w.retries.tokens += float64(avail) // not needed: back in the bucket
	}
}

// delivered reports a port the sink took to the Delivered hook, timed from
// when a source's change first queued it; the caller holds r.mu.
func (r *Router) delivered(w *sinkWorker, sk sinkKey, e exposure, remove bool) {
	at, ok := w.queuedAt[sk]
	delete(w.queuedAt, sk)
	if ok && r.cfg.Delivered != nil {
		r.cfg.Delivered(w.name, e.Claim.Source, remove, time.Since(at))
	}
}

// drain removes every port each sink holds from this agent, and only
// those; workers have stopped.
func (r *Router) drain() {
	var wg sync.WaitGroup
	for _, w := range r.workers {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), r.cfg.DrainTimeout)
			defer cancel()
			r.mu.Lock()
			keys := slices.SortedFunc(maps.Keys(w.acked), compareSinkKeys)
			r.mu.Unlock()
			left := 0
			for _, sk := range keys {
				r.mu.Lock()
				e := w.acked[sk]
				r.mu.Unlock()
				err := w.send(ctx, r, e.change(true))
				if err != nil && !errors.Is(err, ErrPermanent) {
					left++
					if left == 1 {
						w.log.Warn("could not remove a port on shutdown; it stays in the ownership record", zap.Stringer("port", e.Port), zap.Error(err))
					}
					continue
				}
				r.mu.Lock()
				delete(w.acked, sk)
				w.recordDirty = true
				r.mu.Unlock()
			}
			w.flushRecord(r)
			if left > 0 {
				w.log.Warn("ports left on the sink after shutdown", zap.Int("ports", left))
			}
		})
	}
	wg.Wait()
}
