package core

// keyQueue is a FIFO of keys in which each key appears at most once: a key
// that changes again while queued keeps its place, and its delivery uses the
// latest desired state.
type keyQueue struct {
	items []Key
	head  int
	in    map[Key]struct{}
}

func (q *keyQueue) push(k Key) {
	if q.in == nil {
		q.in = make(map[Key]struct{})
	}
	if _, ok := q.in[k]; ok {
		return
	}
	q.in[k] = struct{}{}
	q.items = append(q.items, k)
}

func (q *keyQueue) pop() (Key, bool) {
	if q.head == len(q.items) {
		return Key{}, false
	}
	k := q.items[q.head]
	q.items[q.head] = Key{}
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

func (q *keyQueue) len() int { return len(q.items) - q.head }
