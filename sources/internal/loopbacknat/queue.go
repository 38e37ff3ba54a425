package loopbacknat

import (
	"context"
	"slices"

	"go.uber.org/zap"
)

// Queue asks for owner's rules to become those of bs without waiting for
// iptables: RunQueue applies the requests in the order the owners asked,
// and of an owner that asked again before its turn only the latest. A
// source's event loop queues, so that a container's port never waits for
// the rules of the containers before it (each iptables run reads the
// whole nat table, which grows with every container). Failures are
// logged; the next Sync puts the rules right.
func (m *Manager) Queue(owner string, bs []Binding) {
	m.qmu.Lock()
	if _, waiting := m.pending[owner]; !waiting {
		m.order = append(m.order, owner)
	}
	m.pending[owner] = slices.Clone(bs)
	m.qmu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// RunQueue applies queued requests until ctx is done; requests still
// waiting then are dropped (the next Sync makes the rules whole). The
// requests waiting when it looks are applied as one batch: a burst of
// containers costs one iptables-restore run, not one iptables run per
// rule.
func (m *Manager) RunQueue(ctx context.Context) {
	for ctx.Err() == nil {
		m.mu.Lock()
		n := 0
		for {
			owner, bs, gen, ok := m.next()
			if !ok {
				break
			}
			m.qmu.Lock()
			stale := gen != m.gen
			m.qmu.Unlock()
			if !stale {
				m.set(owner, bs) // errors come from flush
			}
			n++
		}
		err := m.flush()
		m.mu.Unlock()
		if err != nil {
			m.log.Error("loopback NAT rules", zap.Error(err))
		}
		if n > 0 {
			continue // more may have come while iptables ran
		}
		select {
		case <-ctx.Done():
		case <-m.wake:
		}
	}
}

// next takes the oldest waiting request.
func (m *Manager) next() (string, []Binding, uint64, bool) {
	m.qmu.Lock()
	defer m.qmu.Unlock()
	if len(m.order) == 0 {
		return "", nil, 0, false
	}
	owner := m.order[0]
	m.order = m.order[1:]
	bs := m.pending[owner]
	delete(m.pending, owner)
	return owner, bs, m.gen, true
}

// Pending reports how many owners' requests wait in the queue.
func (m *Manager) Pending() int {
	m.qmu.Lock()
	defer m.qmu.Unlock()
	return len(m.order)
}
