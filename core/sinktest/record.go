package sinktest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/guestagent/guestagent/core"
)

// recorder stands between the Router and the instance of the sink under
// test. It keeps the sink's last error, for the checks' messages, and what
// the sink's calls returned during an outage, so that the outage check can
// tell a sink that reported the outage from one that hid it. It passes
// every optional interface through; where the sink lacks one, it behaves
// as if absent (WatchPeer waits for its context, PeerBack never fires,
// Supports takes every port), except Lister, which listingRecorder adds.
type recorder struct {
	sink core.Sink

	mu      sync.Mutex
	last    error         // the last error a call returned
	outage  int           // counts outages; the current one while open
	open    bool          // an outage is under way
	calls   []outcome     // calls that began and ended during the outage
	settled chan struct{} // closed once a call reports the outage or a Send hides it
	said    bool          // a call reported the outage
	hid     bool          // a call returned nil during the outage
}

// outcome is one call to the sink and what it returned.
type outcome struct {
	op   string // "Send" or "List"
	what string // the change sent, for Send
	err  error
}

// record returns a recorder of s and the sink to give the Router: the
// recorder itself, or with List where s is a core.Lister.
func record(s core.Sink) (*recorder, core.Sink) {
	r := &recorder{sink: s}
	if l, ok := s.(core.Lister); ok {
		return r, &listingRecorder{recorder: r, lister: l}
	}
	return r, r
}

// Send calls the sink's Send and records what it returned.
func (r *recorder) Send(ctx context.Context, c core.Change) error {
	during := r.begin()
	err := r.sink.Send(ctx, c)
	r.end(ctx, during, outcome{op: "Send", what: describe(c), err: err})
	return err
}

// WatchPeer calls the sink's WatchPeer, or waits for ctx without one.
func (r *recorder) WatchPeer(ctx context.Context, check func()) {
	if pw, ok := r.sink.(core.PeerWatcher); ok {
		pw.WatchPeer(ctx, check)
		return
	}
	<-ctx.Done()
}

// PeerBack returns the sink's PeerBack, or nil without one.
func (r *recorder) PeerBack() <-chan struct{} {
	if n, ok := r.sink.(core.PeerBackNotifier); ok {
		return n.PeerBack()
	}
	return nil
}

// PeerKeying returns the sink's keying, core.ByAddress without a Keyer.
func (r *recorder) PeerKeying() core.PeerKeying {
	if k, ok := r.sink.(core.Keyer); ok {
		return k.PeerKeying()
	}
	return core.ByAddress
}

// Supports asks the sink's PortFilter, and takes p without one.
func (r *recorder) Supports(p core.Port) error {
	if f, ok := r.sink.(core.PortFilter); ok {
		return f.Supports(p)
	}
	return nil
}

// Close closes the sink where it is an io.Closer.
func (r *recorder) Close() error {
	if c, ok := r.sink.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// listingRecorder is a recorder of a core.Lister.
type listingRecorder struct {
	*recorder
	lister core.Lister
}

// List calls the sink's List and records what it returned.
func (r *listingRecorder) List(ctx context.Context) ([]core.Held, error) {
	during := r.begin()
	held, err := r.lister.List(ctx)
	r.end(ctx, during, outcome{op: "List", err: err})
	return held, err
}

// begin returns the number of the outage under way, 0 when none.
func (r *recorder) begin() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.open {
		return 0
	}
	return r.outage
}

// end records o, the result of a call that began during outage number
// during (0: none). It counts for the outage only when the outage was
// still under way as the call returned: a call that overlaps the peer's
// return may well succeed.
func (r *recorder) end(ctx context.Context, during int, o outcome) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if o.err != nil {
		r.last = o.err
	}
	if during == 0 || !r.open || during != r.outage || ctx.Err() != nil {
		return
	}
	r.calls = append(r.calls, o)
	settled := r.said || r.hid
	switch {
	case o.reportsOutage():
		r.said = true
	case o.err == nil:
		r.hid = true
	default:
		return
	}
	if !settled {
		close(r.settled)
	}
}

// reportsOutage reports whether o tells the Router its peer is down: a
// Send error marked core.PeerDown, or any List error (the Router takes
// every failure to list as the peer being down).
func (o outcome) reportsOutage() bool {
	if o.op == "List" {
		return o.err != nil
	}
	return errors.Is(o.err, core.ErrPeerDown)
}

// lastError returns the last error a call to the sink returned.
func (r *recorder) lastError() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

// beginOutage starts recording the calls of an outage. The peer must be
// down already.
func (r *recorder) beginOutage() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.outage++
	r.open = true
	r.calls = nil
	r.settled = make(chan struct{})
	r.said, r.hid = false, false
}

// awaitOutageReport waits up to timeout for a call that reports the
// outage begun by beginOutage, and ends it. It returns "" when one did and
// no call returned nil meanwhile, and otherwise why the sink fails the
// contract. A call that returns nil ends the wait at once: no change can
// reach a peer that is down, nor can its list be read.
func (r *recorder) awaitOutageReport(timeout time.Duration) string {
	r.mu.Lock()
	settled := r.settled
	r.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-settled:
	case <-t.C:
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.open = false
	if r.said && !r.hid {
		return ""
	}
	return verdict(r.calls, timeout)
}

// mustReport is what the outage check demands of a sink.
const mustReport = "a sink must report an unreachable peer with core.PeerDown"

// verdict says why calls, all that returned during an outage, fail the
// contract: one returned nil, or none reported the outage within timeout.
func verdict(calls []outcome, timeout time.Duration) string {
	var hid, unmarked []outcome
	for _, c := range calls {
		switch {
		case c.err == nil:
			hid = append(hid, c)
		case !c.reportsOutage():
			unmarked = append(unmarked, c)
		}
	}
	switch {
	case len(hid) > 0:
		return fmt.Sprintf("%s returned nil while the peer was down: %s (the router's %s returned nil)", hid[0].op, mustReport, hid[0])
	case len(unmarked) > 0:
		return fmt.Sprintf("Send failed while the peer was down with an error not marked core.PeerDown: %s, so that the router pauses the sink and replays the state once the peer is back (the router's %s: %v)",
			mustReport, unmarked[0], unmarked[0].err)
	default:
		return fmt.Sprintf("no call to the sink returned within %s of the peer going down, though changes were pending: Send must return, with an error marked core.PeerDown, while the peer is unreachable", timeout)
	}
}

// String names the call: "Send of add tcp 127.0.0.1:11001", "List".
func (o outcome) String() string {
	if o.what == "" {
		return o.op
	}
	return o.op + " of " + o.what
}

// describe names a change the Router sends: one port, added or removed.
func describe(c core.Change) string {
	verb := "add"
	if c.Remove {
		verb = "remove"
	}
	if len(c.Mapping.Ports) == 0 {
		return verb + " (no port)"
	}
	return verb + " " + Entry(c.Mapping.Ports[0])
}
