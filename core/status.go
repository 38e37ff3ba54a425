package core

import (
	"maps"
	"net/netip"
	"slices"
	"time"
)

// Status is a point-in-time view of the router, for the status endpoint.
type Status struct {
	// Ports is the ledger: every claimed host address, its claims and
	// what each sink holds for it.
	Ports    []PortStatus   `json:"ports"`
	Mappings []Mapping      `json:"mappings"`
	Refused  []Refusal      `json:"refused"`
	Sources  []SourceStatus `json:"sources,omitempty"`
	Sinks    []SinkStatus   `json:"sinks"`
	// Notes are things sources saw that expose nothing.
	Notes []Note `json:"notes,omitempty"`
}

// PortStatus is one claimed host address.
type PortStatus struct {
	Protocol Protocol      `json:"protocol"`
	HostIP   netip.Addr    `json:"hostIP"`
	HostPort uint16        `json:"hostPort"`
	Claims   []ClaimStatus `json:"claims"`
	Sinks    []PortAtSink  `json:"sinks"`
}

// ClaimStatus is one mapping's claim on a host address, in order of
// arrival: the first one that a sink takes is the one it holds.
type ClaimStatus struct {
	Key           Key           `json:"key"`
	ContainerPort uint16        `json:"containerPort"`
	ConnectAddrs  []ConnectAddr `json:"connectAddrs,omitempty"`
	// Conflict says why the claim is not the one exposed, when it names
	// other backend addresses than the first claim.
	Conflict string `json:"conflict,omitempty"`
}

// States of a port at a sink.
const (
	PortExposed     = "exposed"      // the sink holds it from this agent
	PortPending     = "pending"      // queued, or being sent
	PortRetrying    = "retrying"     // the peer refused it; retried on its own backoff
	PortRejected    = "rejected"     // the peer refused it for good; retried when it changes
	PortUnsupported = "unsupported"  // the sink cannot take it (an IPv6 address on an IPv4 API, say)
	PortElsewhere   = "held-by-peer" // another party holds it with the same target: it works, it is not this agent's
	PortConflict    = "conflict"     // another party holds it with another target
)

// PortAtSink is the state of one host address at one sink.
type PortAtSink struct {
	Sink  string `json:"sink"`
	State string `json:"state"`
	// Held is the address the sink holds for this port when it is another
	// one (peers that key by port alone hold one address per port).
	Held      string    `json:"held,omitempty"`
	Error     string    `json:"error,omitempty"`
	Since     time.Time `json:"since,omitzero"`
	NextRetry time.Time `json:"nextRetry,omitzero"`
}

// SourceStatus describes one source registered with the Router.
type SourceStatus struct {
	Name string `json:"name"`
	// Synced is whether the source has reported its complete state once.
	Synced bool `json:"synced"`
	// Watching says how the source watches, in its own words (empty when
	// it does not say).
	Watching string `json:"watching,omitempty"`
}

// SinkStatus describes one sink's delivery state.
type SinkStatus struct {
	Name        string    `json:"name"`
	Pending     int       `json:"pending"`
	Exposed     int       `json:"exposed"`
	Failing     int       `json:"failing"`
	Delivered   uint64    `json:"delivered"`
	Failures    uint64    `json:"failures"`
	Rejected    uint64    `json:"rejected"`
	Syncs       uint64    `json:"syncs"`
	PeerDown    bool      `json:"peerDown"`
	LastError   string    `json:"lastError,omitempty"`
	LastErrorAt time.Time `json:"lastErrorAt,omitzero"`
}

// Status returns the ledger, the desired mappings, refused ports and
// per-sink delivery counters.
func (r *Router) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{
		Ports:    []PortStatus{},
		Mappings: r.sortedDesired(func(Key) bool { return true }),
		Refused:  []Refusal{},
	}
	for _, k := range slices.SortedFunc(maps.Keys(r.refused), compareKeys) {
		st.Refused = append(st.Refused, r.refused[k]...)
	}
	for _, k := range slices.SortedFunc(maps.Keys(r.notes), compareKeys) {
		st.Notes = append(st.Notes, r.notes[k])
	}
	for _, s := range r.sources {
		_, unsynced := r.unsynced[s.name]
		st.Sources = append(st.Sources, SourceStatus{Name: s.name, Synced: !unsynced, Watching: r.watching[s.name]})
	}
	for _, addr := range r.ledger.addresses() {
		ps := PortStatus{Protocol: addr.Protocol, HostIP: addr.HostIP, HostPort: addr.HostPort}
		claims := r.ledger.onAddress(addr)
		for i, c := range claims {
			cs := ClaimStatus{Key: c.key, ContainerPort: c.port.ContainerPort, ConnectAddrs: c.conn}
			if i > 0 && !c.agrees(claims[0]) {
				cs.Conflict = "another backend than " + claims[0].key.String() + ", which holds the port"
			}
			ps.Claims = append(ps.Claims, cs)
		}
		for _, w := range r.workers {
			if at, ok := r.portAtSink(w, addr, claims); ok {
				ps.Sinks = append(ps.Sinks, at)
			}
		}
		st.Ports = append(st.Ports, ps)
	}
	for _, w := range r.workers {
		s := w.stats
		s.Name = w.name
		s.Pending = w.dirty.len()
		if w.resync {
			s.Pending++
		}
		s.Exposed = len(w.acked)
		for _, f := range w.failing {
			if !f.permanent {
				s.Failing++
			}
		}
		st.Sinks = append(st.Sinks, s)
	}
	return st
}

// portAtSink is the state of addr at w; the caller holds r.mu. It reports
// false when no claim on addr goes to w.
func (r *Router) portAtSink(w *sinkWorker, addr Port, claims []claim) (PortAtSink, bool) {
	at := PortAtSink{Sink: w.name}
	accepted := false
	for _, c := range claims {
		if !w.accept(c.key) {
			continue
		}
		accepted = true
		if err := w.supports(c.port); err != nil {
			at.State, at.Error = PortUnsupported, err.Error()
			continue
		}
		at.State, at.Error = "", ""
		break
	}
	if !accepted {
		return at, false
	}
	if at.State == PortUnsupported {
		return at, true
	}
	sk := w.keyOf(addr)
	if a, ok := w.acked[sk]; ok {
		at.State = PortExposed
		if hostAddr(a.Port) != hostAddr(addr) {
			at.Held = netip.AddrPortFrom(hostAddr(a.Port), a.Port.HostPort).String()
		}
		if w.forced[sk] || w.dirty.has(sk) {
			at.State = PortPending
		}
	} else if f, ok := w.foreign[sk]; ok {
		at.State, at.Error = PortConflict, f.target
		if f.same {
			at.State = PortElsewhere
		}
	} else {
		at.State = PortPending
	}
	if f := w.failing[sk]; f != nil {
		at.State, at.Error, at.Since = PortRetrying, f.err, f.since
		if f.permanent {
			at.State = PortRejected
		} else {
			at.NextRetry = f.next
		}
	}
	return at, true
}
