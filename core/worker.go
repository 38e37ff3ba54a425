package core

import (
	"context"
	"errors"
	"slices"
	"time"

	"go.uber.org/zap"
)

// sinkWorker delivers the router's desired state to one sink. Fields marked
// "mu" are guarded by Router.mu; the others belong to the run goroutine
// (and to drain, once run has returned).
type sinkWorker struct {
	name   string
	sink   Sink
	accept func(Key) bool
	log    *zap.Logger
	wake   chan struct{}

	queue  keyQueue   // mu
	resync bool       // mu
	stats  SinkStatus // mu

	acked  map[Key]Mapping // what the peer was last told, per key
	forced map[Key]bool    // keys whose ports must be re-added in full
	down   bool            // the last failure was ErrPeerDown
}

func (w *sinkWorker) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

type job struct {
	resync bool
	key    Key
}

func (r *Router) nextJob(w *sinkWorker) (job, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w.resync {
		w.resync = false
		return job{resync: true}, true
	}
	k, ok := w.queue.pop()
	return job{key: k}, ok
}

func (r *Router) requeue(w *sinkWorker, j job, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if j.resync {
		w.resync = true
	} else {
		w.queue.push(j.key)
	}
	w.stats.Failures++
	w.stats.LastError = err.Error()
	w.stats.LastErrorAt = time.Now()
	w.stats.PeerDown = errors.Is(err, ErrPeerDown)
}

func (w *sinkWorker) run(ctx context.Context, r *Router, syncGo <-chan struct{}) {
	_, isSyncer := w.sink.(Syncer)
	if !isSyncer {
		syncGo = nil // plain sinks start from an empty peer and need no initial sync
	}
	attempt := 0
	for ctx.Err() == nil {
		j, ok := r.nextJob(w)
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-w.wake:
			case <-syncGo:
				syncGo = nil
				r.requestResync(w)
			}
			continue
		}
		err := w.do(ctx, r, j)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			r.requeue(w, j, err)
			w.down = w.down || errors.Is(err, ErrPeerDown)
			delay := r.cfg.Backoff.Delay(attempt)
			attempt++
			w.log.Warn("delivery failed; will retry", zap.Error(err), zap.Duration("retry_in", delay), zap.Bool("peer_down", w.down))
			if !Sleep(ctx, delay) {
				return
			}
			continue
		}
		attempt = 0
		if w.down {
			w.down = false
			w.log.Info("peer reachable again; replaying full state")
			r.mu.Lock()
			w.stats.PeerDown = false
			w.resync = true
			r.mu.Unlock()
		}
	}
}

func (w *sinkWorker) do(ctx context.Context, r *Router, j job) error {
	if j.resync {
		return w.doResync(ctx, r)
	}
	r.mu.Lock()
	d, wanted := r.desired[j.key]
	r.mu.Unlock()
	return w.deliver(ctx, r, j.key, d, wanted)
}

// doResync makes the peer match the desired state again, through Sync where
// the sink has it and by re-adding every mapping otherwise.
func (w *sinkWorker) doResync(ctx context.Context, r *Router) error {
	r.mu.Lock()
	desired := r.sortedDesired(w.accept)
	r.mu.Unlock()
	if s, ok := w.sink.(Syncer); ok {
		sctx, cancel := context.WithTimeout(ctx, r.cfg.SendTimeout)
		defer cancel()
		if err := s.Sync(sctx, desired); err != nil {
			return err
		}
		clear(w.acked)
		clear(w.forced)
		for _, m := range desired {
			w.acked[m.Key] = m
		}
		r.mu.Lock()
		w.stats.Syncs++
		r.mu.Unlock()
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range desired {
		w.forced[m.Key] = true
		w.queue.push(m.Key)
	}
	for k := range w.acked {
		w.queue.push(k)
	}
	w.stats.Syncs++
	return nil
}

// deliver sends what changed for key k: a remove of the ports that went,
// then an add of those that came.
func (w *sinkWorker) deliver(ctx context.Context, r *Router, k Key, d Mapping, wanted bool) error {
	a := w.acked[k]
	if !wanted {
		d = Mapping{Key: k}
	}
	went, came := diffPorts(a, d, w.forced[k])
	if len(went) > 0 {
		err := w.send(ctx, r, Change{Remove: true, Mapping: Mapping{Key: k, Ports: went, ConnectAddrs: a.ConnectAddrs}})
		if err != nil {
			return err
		}
		a.Ports = slices.DeleteFunc(slices.Clone(a.Ports), func(p Port) bool { return slices.Contains(went, p) })
		w.acked[k] = a
	}
	if len(came) > 0 {
		err := w.send(ctx, r, Change{Mapping: Mapping{Key: k, Ports: came, ConnectAddrs: d.ConnectAddrs}})
		if err != nil {
			return err
		}
	}
	if len(d.Ports) == 0 {
		delete(w.acked, k)
	} else {
		w.acked[k] = d
	}
	delete(w.forced, k)
	return nil
}

// send delivers one change; a permanent failure is logged, counted and
// treated as done, so it is not retried.
func (w *sinkWorker) send(ctx context.Context, r *Router, c Change) error {
	sctx, cancel := context.WithTimeout(ctx, r.cfg.SendTimeout)
	defer cancel()
	err := w.sink.Send(sctx, c)
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case err == nil:
		w.stats.Delivered++
		w.log.Debug("delivered", zap.Stringer("change", c))
		return nil
	case errors.Is(err, ErrPermanent):
		w.stats.Rejected++
		w.stats.LastError = err.Error()
		w.stats.LastErrorAt = time.Now()
		w.log.Error("sink rejected change; not retrying", zap.Stringer("change", c), zap.Error(err))
		return nil
	default:
		return err
	}
}

// diffPorts returns the ports of acked a that d no longer has and the ports
// of d to add. A change of backend addresses replaces every port; forced
// re-adds all of d.
func diffPorts(a, d Mapping, forced bool) (went, came []Port) {
	if len(a.Ports) > 0 && len(d.Ports) > 0 && !slices.Equal(a.ConnectAddrs, d.ConnectAddrs) {
		return a.Ports, d.Ports
	}
	for _, p := range a.Ports {
		if !slices.Contains(d.Ports, p) {
			went = append(went, p)
		}
	}
	if forced {
		return went, d.Ports
	}
	for _, p := range d.Ports {
		if !slices.Contains(a.Ports, p) {
			came = append(came, p)
		}
	}
	return went, came
}
