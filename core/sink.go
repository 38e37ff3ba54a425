package core

import (
	"context"
	"errors"
)

// Sink delivers changes to a peer that exposes ports. The Router sends one
// host port per Change: Mapping.Ports holds exactly one port, and
// Mapping.Key names the claim it came from (for logs). It keeps the
// bookkeeping of which ports are wanted and by whom, so a sink never needs
// reference counts of its own.
//
// A sink that holds resources (connections, idle HTTP connections,
// goroutines) implements io.Closer. A Router that ran calls Close once,
// when its Run returns: after the sink's worker and peer watcher have
// stopped (the last Send, List and WatchPeer returned) and the drain on
// exit is done, and never calls the sink again. Its error is logged. A sink
// never given to a running Router is closed by whoever made it.
type Sink interface {
	// Send delivers c to the peer. It must be idempotent: adding a port the
	// peer already has with the same target succeeds (or, from a peer that
	// cannot tell whose it is, fails with HeldElsewhere), and removing one
	// it does not have succeeds. Failures are retried per port with backoff unless marked
	// Permanent; errors that mean the peer could not be reached at all are
	// marked PeerDown, so that the full state is replayed once it is back.
	// A port another party holds is reported with HeldElsewhere or
	// Conflict.
	Send(ctx context.Context, c Change) error
}

// Held is one port a sink's peer holds, as the peer lists it.
type Held struct {
	// Port is the protocol, host address and host port of the entry; its
	// container port is unknown and zero.
	Port Port
	// Target is where the peer sends the port's traffic, for status and
	// logs (e.g. "192.168.127.2:8080").
	Target string
	// Matches is true when the entry is exactly what the sink would create
	// for Port, so that it may be this agent's own.
	Matches bool
}

// Lister is implemented by sinks that can read their peer's actual state.
// The Router lists the peer at start, after the peer was down and when a
// PeerWatcher asks for a check, and reconciles per port: it exposes what is
// missing, removes what this agent created and no longer wants, and never
// touches entries it did not create (the ownership record says which).
type Lister interface {
	List(ctx context.Context) ([]Held, error)
}

// PeerWatcher is implemented by sinks that can notice, without a pending
// change, that their peer may have lost or changed its state (it restarted,
// say). WatchPeer runs until ctx is done and calls check each time; the
// Router then reconciles the sink: through List where the sink has it, by
// replaying every port otherwise.
type PeerWatcher interface {
	WatchPeer(ctx context.Context, check func())
}

// PeerBackNotifier is implemented by sinks that watch their peer's
// reachability themselves (a PeerWatcher that probes it, say). While the
// peer is unreachable the Router waits out its backoff before trying again;
// a value on PeerBack ends that wait at once, so a peer that answers again
// is reconciled without waiting for the rest of the backoff.
type PeerBackNotifier interface {
	PeerBack() <-chan struct{}
}

// PeerKeying says which parts of a port a sink's peer uses to tell ports
// apart. The Router sends a peer at most one port per peer key, and removes
// it only when no claim for that key remains.
type PeerKeying int

// The ways peers key ports.
const (
	// ByAddress: protocol, host IP and host port.
	ByAddress PeerKeying = iota
	// ByPort: protocol and host port only; a remove closes the port
	// whatever its address.
	ByPort
)

// Keyer is implemented by sinks whose peer keys ports other than ByAddress.
type Keyer interface {
	PeerKeying() PeerKeying
}

// PortFilter is implemented by sinks whose peer cannot take every port (an
// IPv4-only API, say). Ports it refuses are never sent; the status shows
// them as not supported by the sink.
type PortFilter interface {
	// Supports returns nil when p can be sent, or an error saying why not.
	Supports(p Port) error
}

// Marks of sink errors, tested with errors.Is.
var (
	// ErrPermanent marks a change a sink can never apply; it is reported
	// per port and not retried until the port changes.
	ErrPermanent = errors.New("permanent failure")
	// ErrPeerDown marks a failure to reach the peer at all.
	ErrPeerDown = errors.New("peer unreachable")
	// ErrHeldElsewhere marks an add of a port the peer already holds for
	// another party, with the same target: the port works, but it is not
	// this agent's and is never removed by it.
	ErrHeldElsewhere = errors.New("held by another party")
	// ErrConflict marks an add of a port another party holds with another
	// target; it is reported and checked again at the next reconcile.
	ErrConflict = errors.New("held by another party with another target")
)

type markedError struct {
	mark error
	err  error
}

func (e *markedError) Error() string   { return e.err.Error() }
func (e *markedError) Unwrap() []error { return []error{e.mark, e.err} }

func mark(m, err error) error {
	if err == nil {
		return nil
	}
	return &markedError{mark: m, err: err}
}

// Permanent marks err as one that retrying will not fix.
func Permanent(err error) error { return mark(ErrPermanent, err) }

// PeerDown marks err as a failure to reach the peer.
func PeerDown(err error) error { return mark(ErrPeerDown, err) }

// HeldElsewhere marks err as the answer to adding a port another party
// already holds with the same target.
func HeldElsewhere(err error) error { return mark(ErrHeldElsewhere, err) }

// Conflict marks err as the answer to adding a port another party holds
// with another target.
func Conflict(err error) error { return mark(ErrConflict, err) }
