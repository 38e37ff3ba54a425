package core

import "time"

// retryBudget is a token bucket: retries of refused ports spend one token
// each; tokens come back at a steady rate up to a burst.
type retryBudget struct {
	tokens float64
	at     time.Time // when tokens was counted; zero: full
}

// take returns how many of n retries may go now (at most the tokens left),
// and spends them.
func (b *retryBudget) take(now time.Time, n int, rate float64, burst int) int {
	switch {
	case b.at.IsZero():
		b.tokens = float64(burst)
		b.at = now
	case now.After(b.at):
		// A now older than the last count (a batch's, planned before a
		// later pushDue counted) adds nothing and moves nothing back:
		// moving back would count that time's tokens twice.
		b.tokens = min(float64(burst), b.tokens+now.Sub(b.at).Seconds()*rate)
		b.at = now
	}
	n = min(n, int(b.tokens))
	b.tokens -= float64(n)
	return n
}

// next is when the bucket holds a second's worth of tokens again (a
// burst's, when that is less): a worker held back by the budget wakes
// once a second, not once a token.
func (b *retryBudget) next(rate float64, burst int) time.Time {
	want := min(max(rate, 1), float64(burst))
	if b.at.IsZero() || b.tokens >= want {
		return b.at
	}
	return b.at.Add(time.Duration((want - b.tokens) / rate * float64(time.Second)))
}
