package sockets

import (
	"slices"
	"time"

	"github.com/guestagent/guestagent/core"
)

// candidate is one identity a scan found, with the inodes of the sockets
// behind it (several with SO_REUSEPORT), sorted.
type candidate struct {
	port   core.Port
	inodes []uint32
}

// gate holds a socket back until scans have seen it for settle without a
// gap, and lets its removal through on the first scan that misses it. It is
// used by one goroutine.
type gate struct {
	settle  time.Duration
	entries map[string]*entry
}

// entry is one identity the gate knows.
type entry struct {
	candidate
	first time.Time // first seen, or when its sockets last changed before it was reported
	// reported: handed on; excluded: its sockets belong to the agent or to
	// a process that another source reports. Neither is looked at again
	// while the identity stays.
	reported, excluded bool
}

func newGate(settle time.Duration) *gate {
	return &gate{settle: settle, entries: map[string]*entry{}}
}

// observe takes the identities one scan found at now. It returns the ids
// that have now been seen for the settle time and wait for report or
// exclude (ready), the reported ids that are gone, the ids that went away
// before they settled (transient), and how long until the next pending id
// settles (0 when none waits).
func (g *gate) observe(now time.Time, seen map[string]candidate) (ready, gone, transient []string, next time.Duration) {
	for id, c := range seen {
		e, ok := g.entries[id]
		switch {
		case !ok:
			g.entries[id] = &entry{candidate: c, first: now}
		case !slices.Equal(e.inodes, c.inodes) && !e.reported:
			// Other sockets hold the identity now (a proxy handed the port
			// on, a process restarted): judge them afresh.
			*e = entry{candidate: c, first: now}
		default:
			e.candidate = c
		}
	}
	for id, e := range g.entries {
		if _, ok := seen[id]; ok {
			continue
		}
		switch {
		case e.reported:
			gone = append(gone, id)
		case !e.excluded:
			transient = append(transient, id)
		}
		delete(g.entries, id)
	}
	for id, e := range g.entries {
		if e.reported || e.excluded {
			continue
		}
		if left := e.first.Add(g.settle).Sub(now); left > 0 {
			if next == 0 || left < next {
				next = left
			}
			continue
		}
		ready = append(ready, id)
	}
	slices.Sort(ready)
	slices.Sort(gone)
	slices.Sort(transient)
	return ready, gone, transient, next
}

// report marks a ready id as handed on.
func (g *gate) report(id string) { g.entries[id].reported = true }

// exclude marks a ready id as never to be reported while it stays.
func (g *gate) exclude(id string) { g.entries[id].excluded = true }

// inodes returns the sockets behind id.
func (g *gate) inodes(id string) []uint32 { return g.entries[id].inodes }

// mapping returns the mapping of a known id.
func (g *gate) mapping(id string) core.Mapping {
	return core.Mapping{Key: core.Key{Source: Name, ID: id}, Ports: []core.Port{g.entries[id].port}}
}

// reported returns the mappings of every reported id, sorted by id.
func (g *gate) reported() []core.Mapping {
	var ids []string
	for id, e := range g.entries {
		if e.reported {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	out := make([]core.Mapping, len(ids))
	for i, id := range ids {
		out[i] = g.mapping(id)
	}
	return out
}
