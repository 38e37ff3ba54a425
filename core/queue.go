package core

// keyQueue is a FIFO in which each key appears at most once: a key that
// changes again while queued keeps its place, and its delivery uses the
// latest desired state.
type keyQueue[K comparable] struct {
	items []K
	head  int
	in    map[K]struct{}
}

func (q *keyQueue[K]) push(k K) {
	if q.in == nil {
		q.in = make(map[K]struct{})
	}
	if _, ok := q.in[k]; ok {
		return
	}
	q.in[k] = struct{}{}
	q.items = append(q.items, k)
}

func (q *keyQueue[K]) pop() (K, bool) {
	var zero K
	if q.head == len(q.items) {
		return zero, false
	}
	k := q.items[q.head]
	q.items[q.head] = zero
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	} else if q.head > 64 && q.head*2 > len(q.items) {
		n := copy(q.items, q.items[q.head:])
		q.items, q.head = q.items[:n], 0
	}
	delete(q.in, k)
	return k, true
}

func (q *keyQueue[K]) len() int { return len(q.items) - q.head }

func (q *keyQueue[K]) has(k K) bool {
	_, ok := q.in[k]
	return ok
}
