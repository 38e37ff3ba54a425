package core

import (
	"context"
	"errors"
)

// Sink delivers changes to a peer that exposes ports.
type Sink interface {
	// Send delivers c to the peer. It must be idempotent: adding a port the
	// peer already has, or removing one it does not have, succeeds. A failure
	// is retried by the Router with backoff unless it is marked Permanent.
	// Errors that mean the peer could not be reached should be marked with
	// PeerDown, so that the full state is replayed once it is back.
	Send(ctx context.Context, c Change) error
}

// Syncer is implemented by sinks that can read their peer's actual state.
// The Router calls Sync instead of replaying adds: once at start (after the
// sources have reported or a grace period passed), after the peer was down,
// and when a PeerWatcher reports a lost peer. Sync makes the peer expose
// exactly what desired says, removing anything this agent left behind.
type Syncer interface {
	Sync(ctx context.Context, desired []Mapping) error
}

// PeerWatcher is implemented by sinks that can notice, without a pending
// change, that their peer lost its state (it restarted, say). WatchPeer runs
// until ctx is done and calls lost each time; the Router then replays the
// full desired state to the sink.
type PeerWatcher interface {
	WatchPeer(ctx context.Context, lost func())
}

// ErrPermanent marks a change a sink can never apply (an IPv6 binding on an
// IPv4-only API, say); the Router logs it and does not retry.
var ErrPermanent = errors.New("permanent failure")

// ErrPeerDown marks a failure to reach the peer at all.
var ErrPeerDown = errors.New("peer unreachable")

type markedError struct {
	mark error
	err  error
}

func (e *markedError) Error() string   { return e.err.Error() }
func (e *markedError) Unwrap() []error { return []error{e.mark, e.err} }

// Permanent marks err as one that retrying will not fix.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &markedError{mark: ErrPermanent, err: err}
}

// PeerDown marks err as a failure to reach the peer.
func PeerDown(err error) error {
	if err == nil {
		return nil
	}
	return &markedError{mark: ErrPeerDown, err: err}
}
