package hostswitch

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
	"time"
)

// The probe asks for the expose path with GET on a connection it keeps
// open. gvproxy answers "post only" (HTTP 400) without touching its state,
// so the probe costs one small request and answer whatever the number of
// forwards, unlike a list of them. It tells a restart by its connection: a
// restarted host-switch has a new network stack that knows nothing of the
// old connection (on the virtual network its first packet is answered with
// a reset; on a local socket the kill closed it), so the answer comes on a
// new connection, or, while host-switch is down, none comes at all.
const (
	// DefaultProbeInterval is how often the probe asks by default.
	DefaultProbeInterval = 500 * time.Millisecond
	// MaxProbeInterval bounds the probe interval: gvproxy closes
	// connections idle for its read timeout (10 s), and the probe's must
	// only ever be replaced by a restart.
	MaxProbeInterval = 5 * time.Second
	// DefaultCheckInterval is how often the whole list is read by default.
	DefaultCheckInterval = 5 * time.Second
	// minProbeTimeout and maxProbeTimeout bound the time one probe may
	// take, which is its interval otherwise: a working host-switch
	// answers in a millisecond, and a probe that outlives its interval
	// most likely sits in a connection the restart made dead (its packets
	// lost while the virtual network was down, and retransmitted ever
	// more slowly), which the next probe replaces by a new one.
	minProbeTimeout = 500 * time.Millisecond
	maxProbeTimeout = 2 * time.Second
)

// probeResult is what one probe found.
type probeResult int

const (
	probeSame      probeResult = iota // answered on the connection of the last answer
	probeFirst                        // the first answer of this run
	probeNew                          // answered on a new connection: host-switch may have restarted
	probeBack                         // answered after failing
	probeFailed                       // no answer, after an answer
	probeStillDown                    // no answer again
)

// probeTimeout is how long one probe at interval every may take.
func probeTimeout(every time.Duration) time.Duration {
	return min(max(every, minProbeTimeout), maxProbeTimeout)
}

// prober holds the probe's connection; one goroutine uses it at a time.
type prober struct {
	url      string
	timeout  time.Duration
	client   *http.Client
	answered bool // a probe was answered before
	down     bool // the last probe failed
}

// up reports whether the last probe was answered.
func (p *prober) up() bool { return p.answered && !p.down }

func newProber(base string, timeout time.Duration, dial dialFunc) *prober {
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         dial,
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     0, // kept until it breaks: its loss is the signal
		DisableCompression:  true,
	}
	return &prober{url: base + exposePath, timeout: timeout, client: &http.Client{Transport: tr}}
}

// probe asks host-switch once and says what it found.
func (p *prober) probe(ctx context.Context) (probeResult, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	fresh, err := p.ask(ctx)
	if err != nil {
		// A connection that failed is not used again; drop any other so
		// the next probe starts afresh.
		p.client.CloseIdleConnections()
		if p.down {
			return probeStillDown, err
		}
		p.down = true
		return probeFailed, err
	}
	r := probeSame
	switch {
	case p.down:
		r = probeBack
	case !p.answered:
		r = probeFirst
	case fresh:
		r = probeNew
	}
	p.down, p.answered = false, true
	return r, nil
}

// ask sends the probe's request and reports whether its answer came on a
// new connection.
func (p *prober) ask(ctx context.Context) (bool, error) {
	// net/http retries a GET that fails on a reused connection on a new
	// one, so the connection that carried the answer is the last one
	// reported.
	var reused atomic.Bool
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused.Store(i.Reused) }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, p.url, nil)
	if err != nil {
		return false, err
	}
	res, err := p.client.Do(req)
	if err != nil {
		return false, err
	}
	// Read the answer to its end so that the connection is kept.
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 4096))
	res.Body.Close()
	if res.StatusCode >= 500 {
		// Not gvproxy's answer (it says 400 "post only"): something in
		// between answers for a host-switch that is not there.
		return false, fmt.Errorf("probe: HTTP %d from %s", res.StatusCode, p.url)
	}
	return !reused.Load(), nil
}

// close releases the probe's connection.
func (p *prober) close() { p.client.CloseIdleConnections() }
