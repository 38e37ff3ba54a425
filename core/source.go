package core

import "context"

// Emitter receives what a source observes. The Router hands each source its
// own Emitter, which fills in the source's name; calls are cheap and never
// wait on a sink.
type Emitter interface {
	// Set declares that the mapping m.ID should expose exactly m.Ports: an
	// add when the id is new, an update otherwise. Invalid ports are logged
	// and left out; the valid ones still count.
	Set(m Mapping)
	// Delete declares that the mapping id should expose nothing. Deleting an
	// unknown id does nothing.
	Delete(id string)
	// Snapshot declares the complete set of mappings of the source, as after
	// a (re)connect: every id of the source that is not in ms is deleted.
	Snapshot(ms []Mapping)
}

// Source watches one place where ports can need exposing.
type Source interface {
	// Run watches until ctx is done and reports through out. It handles
	// reconnects itself; it returns nil once ctx is done, or an error it
	// cannot recover from, after which the Router restarts it with backoff.
	// Run must not leave goroutines behind when it returns.
	Run(ctx context.Context, out Emitter) error
}

// SourceFunc adapts a function to the Source interface.
type SourceFunc func(ctx context.Context, out Emitter) error

// Run calls f.
func (f SourceFunc) Run(ctx context.Context, out Emitter) error { return f(ctx, out) }

// Note is something a source saw that exposes no port, kept so that the
// status can point at it when a user asks why a port is not exposed (a
// Kubernetes service of type ClusterIP, say).
type Note struct {
	Key Key `json:"key"`
	// What names the thing ("Kubernetes service default/web").
	What string `json:"what"`
	// Ports are its ports; their host ports may be zero.
	Ports []Port `json:"ports"`
	// Reason says why nothing is exposed.
	Reason string `json:"reason"`
}

// Describer is implemented by the Emitter the Router hands sources.
// Describe sets one line that says how the source watches (which of its
// ways of watching is in use, say); the status shows the latest one.
type Describer interface {
	Describe(how string)
}

// Noter is implemented by the Emitter the Router hands sources. Note keeps
// n under its ID until the source sets, deletes or notes that ID again, or
// leaves it out of a snapshot; a note without ports is forgotten.
type Noter interface {
	Note(n Note)
}
