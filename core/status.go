package core

import (
	"cmp"
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
// per-sink delivery counters. It holds the router's lock only to copy
// what it reports; the sorting and each port's state at each sink are
// worked out from the copy, so that readers of the status (many of them,
// in a loop) barely slow delivery.
func (r *Router) Status() Status {
	return r.copyForStatus().status()
}

// statusCopy is what Status reports, copied under r.mu and read without
// it. The slices inside mappings, refusals, notes and claims are shared
// with the router, which replaces them and never changes them in place.
type statusCopy struct {
	mappings []Mapping
	refused  []Refusal
	spans    []refusalSpan // refused by key, in the router's order within each
	notes    []Note
	sources  []SourceStatus
	claims   []claim
	sinks    []sinkCopy
}

// refusalSpan is refused[from:to], the refusals of key.
type refusalSpan struct {
	key      Key
	from, to int
}

// sinkCopy is one sink worker's part of a statusCopy.
type sinkCopy struct {
	w       *sinkWorker // for what is set at its creation: name, accept, filter, keying
	stats   SinkStatus
	acked   map[sinkKey]exposure
	forced  map[sinkKey]bool
	dirty   map[sinkKey]struct{}
	foreign map[sinkKey]foreignHold
	failing map[sinkKey]portFailure
}

func (r *Router) copyForStatus() *statusCopy {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := &statusCopy{
		mappings: make([]Mapping, 0, len(r.desired)),
		claims:   make([]claim, 0, len(r.ledger.byPort)),
	}
	for _, m := range r.desired {
		c.mappings = append(c.mappings, m)
	}
	for k, rs := range r.refused {
		c.spans = append(c.spans, refusalSpan{key: k, from: len(c.refused), to: len(c.refused) + len(rs)})
		c.refused = append(c.refused, rs...)
	}
	for _, n := range r.notes {
		c.notes = append(c.notes, n)
	}
	for _, s := range r.sources {
		_, unsynced := r.unsynced[s.name]
		c.sources = append(c.sources, SourceStatus{Name: s.name, Synced: !unsynced, Watching: r.watching[s.name]})
	}
	for _, cs := range r.ledger.byPort {
		c.claims = append(c.claims, cs...)
	}
	for _, w := range r.workers {
		sc := sinkCopy{
			w:       w,
			stats:   w.stats,
			acked:   maps.Clone(w.acked),
			forced:  maps.Clone(w.forced),
			dirty:   maps.Clone(w.dirty.in),
			foreign: maps.Clone(w.foreign),
			failing: make(map[sinkKey]portFailure, len(w.failing)),
		}
		sc.stats.Name = w.name
		sc.stats.Pending = w.dirty.len()
		if w.resync {
			sc.stats.Pending++
		}
		sc.stats.Exposed = len(w.acked)
		for sk, f := range w.failing {
			sc.failing[sk] = *f
			if !f.permanent {
				sc.stats.Failing++
			}
		}
		c.sinks = append(c.sinks, sc)
	}
	return c
}

// status builds the Status from the copy.
func (c *statusCopy) status() Status {
	st := Status{Ports: []PortStatus{}, Mappings: c.mappings, Refused: make([]Refusal, 0, len(c.refused))}
	slices.SortFunc(st.Mappings, func(a, b Mapping) int { return compareKeys(a.Key, b.Key) })
	slices.SortFunc(c.spans, func(a, b refusalSpan) int { return compareKeys(a.key, b.key) })
	for _, sp := range c.spans {
		st.Refused = append(st.Refused, c.refused[sp.from:sp.to]...)
	}
	slices.SortFunc(c.notes, func(a, b Note) int { return compareKeys(a.Key, b.Key) })
	st.Notes = c.notes
	st.Sources = c.sources
	// By host address, then in order of arrival: the ledger's addresses
	// and the claims on each.
	slices.SortFunc(c.claims, func(a, b claim) int {
		return cmp.Or(cmp.Compare(a.port.Protocol, b.port.Protocol), cmp.Compare(a.port.HostPort, b.port.HostPort),
			hostAddr(a.port).Compare(hostAddr(b.port)), cmp.Compare(a.seq, b.seq))
	})
	for i := 0; i < len(c.claims); {
		first := c.claims[i]
		addr := Port{Protocol: first.port.Protocol, HostIP: hostAddr(first.port), HostPort: first.port.HostPort}
		j := i + 1
		for j < len(c.claims) && c.claims[j].port.Protocol == addr.Protocol && c.claims[j].port.HostPort == addr.HostPort && hostAddr(c.claims[j].port) == addr.HostIP {
			j++
		}
		claims := c.claims[i:j:j]
		i = j
		ps := PortStatus{Protocol: addr.Protocol, HostIP: addr.HostIP, HostPort: addr.HostPort, Claims: make([]ClaimStatus, 0, len(claims))}
		for k, cl := range claims {
			cs := ClaimStatus{Key: cl.key, ContainerPort: cl.port.ContainerPort, ConnectAddrs: cl.conn}
			if k > 0 && !cl.agrees(claims[0]) {
				cs.Conflict = "another backend than " + claims[0].key.String() + ", which holds the port"
			}
			ps.Claims = append(ps.Claims, cs)
		}
		for _, s := range c.sinks {
			if at, ok := s.portAt(addr, claims); ok {
				ps.Sinks = append(ps.Sinks, at)
			}
		}
		st.Ports = append(st.Ports, ps)
	}
	for _, s := range c.sinks {
		st.Sinks = append(st.Sinks, s.stats)
	}
	return st
}

// portAt is the state of addr at the sink. It reports false when no claim
// on addr goes to the sink.
func (s *sinkCopy) portAt(addr Port, claims []claim) (PortAtSink, bool) {
	w := s.w
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
	if a, ok := s.acked[sk]; ok {
		at.State = PortExposed
		if hostAddr(a.Port) != hostAddr(addr) {
			at.Held = netip.AddrPortFrom(hostAddr(a.Port), a.Port.HostPort).String()
		}
		if _, dirty := s.dirty[sk]; s.forced[sk] || dirty {
			at.State = PortPending
		}
	} else if f, ok := s.foreign[sk]; ok {
		at.State, at.Error = PortConflict, f.target
		if f.same {
			at.State = PortElsewhere
		}
	} else {
		at.State = PortPending
	}
	if f, ok := s.failing[sk]; ok {
		at.State, at.Error, at.Since = PortRetrying, f.err, f.since
		if f.permanent {
			at.State = PortRejected
		} else {
			at.NextRetry = f.next
		}
	}
	return at, true
}
