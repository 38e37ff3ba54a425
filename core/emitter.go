package core

import (
	"maps"
	"slices"
)

type emitter struct {
	r      *Router
	source string
}

// Interface guards: sources may note what they saw and say how they watch.
var (
	_ Noter     = (*emitter)(nil)
	_ Describer = (*emitter)(nil)
)

func (e *emitter) Describe(how string) {
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	if e.r.watching[e.source] == how {
		return
	}
	e.r.watching[e.source] = how
	e.r.notify()
}

func (e *emitter) Set(m Mapping) {
	m.Source = e.source
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	delete(e.r.notes, m.Key)
	e.r.set(m)
}

func (e *emitter) Delete(id string) {
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	delete(e.r.notes, Key{Source: e.source, ID: id})
	e.r.remove(Key{Source: e.source, ID: id})
}

func (e *emitter) Note(n Note) {
	n.Key.Source = e.source
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	if len(n.Ports) == 0 {
		delete(e.r.notes, n.Key)
	} else {
		n.Ports = slices.Clone(n.Ports)
		e.r.notes[n.Key] = n
	}
	e.r.notify()
}

func (e *emitter) Snapshot(ms []Mapping) {
	keep := make(map[string]struct{}, len(ms))
	for _, m := range ms {
		keep[m.ID] = struct{}{}
	}
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	for _, k := range slices.SortedFunc(maps.Keys(e.r.desired), compareKeys) {
		if _, ok := keep[k.ID]; k.Source == e.source && !ok {
			e.r.remove(k)
		}
	}
	for k := range e.r.notes {
		if _, ok := keep[k.ID]; k.Source == e.source && !ok {
			delete(e.r.notes, k)
		}
	}
	for k := range e.r.refused {
		if _, ok := keep[k.ID]; k.Source == e.source && !ok {
			delete(e.r.refused, k)
		}
	}
	for _, m := range ms {
		m.Source = e.source
		e.r.set(m)
	}
	e.r.markSynced(e.source)
}
