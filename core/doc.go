// Package core holds the port-mapping model, the Source and Sink interfaces,
// and the Router that keeps the desired state and delivers it to sinks.
//
// The pieces: the Router (router.go) keeps the mappings each source wants
// and, from them, the claims (claims.go): which mappings claim which host
// port, the earliest claim on an address winning. Each sink has a sink
// worker (worker.go), which delivers the claims to the sink's peer port by
// port, deciding what each port needs with planStep (plan.go), a function
// of the port's state that changes nothing; and each sink has an ownership
// record (ownership.go), the durable list of what this agent exposed on
// that sink, so that a restarted agent removes its own leftovers and
// nothing else. The lock boundary: Router.mu guards the Router's state
// (desired mappings, claims, refusals, notes, which sources have synced)
// and each sink worker's delivery state, the fields marked "mu" in
// sinkWorker (its queue, what its peer acknowledged, the failing, foreign,
// forced and inherited ports, the retry budget, its status). A worker's
// run goroutine owns alone, without the lock, the calls to its peer (Send,
// List), its backoff, and the ownership record: the worker copies under
// Router.mu what changed in what the peer acknowledged, then the record
// compares and writes it without the lock. The record belongs to one
// goroutine at a time (the worker, then the drain) and never takes
// Router.mu.
package core
