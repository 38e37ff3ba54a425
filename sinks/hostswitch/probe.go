package hostswitch

import (
	"context"
	"fmt"
	"io"
	"net"
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
//
// Between probes the agent does nothing: the kept connection tells of a
// restart by itself. The kernel closes it when host-switch's process ends
// on this machine, and on the virtual network its TCP keep-alive (sent by
// the kernel every keepAliveIdle, with no work in the agent) draws a reset
// from a restarted host-switch, or times out while none answers. Either
// way the read that net/http keeps waiting on an idle connection fails,
// and the probe runs at once instead of at its next tick. While host-switch
// does not answer, the probe runs every downProbeInterval.
const (
	// DefaultProbeInterval is how often the probe asks by default: often
	// enough that gvproxy never closes the probe's connection as idle.
	DefaultProbeInterval = 5 * time.Second
	// MaxProbeInterval bounds the probe interval: gvproxy closes
	// connections idle for its read timeout (10 s), and the probe's must
	// only ever be replaced by a restart.
	MaxProbeInterval = 5 * time.Second
	// DefaultCheckInterval is how often the whole list is read by default.
	DefaultCheckInterval = 5 * time.Second
	// downProbeInterval is how often the probe asks while host-switch
	// does not answer (at most ProbeInterval), so that its return is
	// noticed soon.
	downProbeInterval = 200 * time.Millisecond
	// keepAliveIdle is the idle time before the kernel's first TCP
	// keep-alive on the probe's connection, and the time between two;
	// keepAliveCount unanswered ones end it.
	keepAliveIdle  = time.Second
	keepAliveCount = 2
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
	url      string // the probe's: the expose path
	listURL  string // the list's, when the probe reads the forwards too
	timeout  time.Duration
	client   *http.Client
	answered bool          // a probe was answered before
	down     bool          // the last probe failed
	lost     chan struct{} // the kept connection failed while the agent did not close it
}

// up reports whether the last probe was answered.
func (p *prober) up() bool { return p.answered && !p.down }

func newProber(base string, timeout time.Duration, dial dialFunc) *prober {
	p := &prober{url: base + exposePath, listURL: base + allPath, timeout: timeout, lost: make(chan struct{}, 1)}
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         p.watched(dial),
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     0, // kept until it breaks: its loss is the signal
		DisableCompression:  true,
	}
	p.client = &http.Client{Transport: tr}
	return p
}

// watched wraps dial: the connections it makes have the kernel's TCP
// keep-alive on, and a read that fails on one (net/http keeps a read
// waiting on an idle connection) signals lost, unless the agent closed it.
func (p *prober) watched(dial dialFunc) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: keepAliveIdle, Interval: keepAliveIdle, Count: keepAliveCount})
		}
		return &watchedConn{Conn: c, lost: p.lost}, nil
	}
}

// watchedConn is a connection of the probe's.
type watchedConn struct {
	net.Conn
	lost   chan<- struct{}
	closed atomic.Bool
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil && !c.closed.Load() {
		select {
		case c.lost <- struct{}{}:
		default:
		}
	}
	return n, err
}

func (c *watchedConn) Close() error {
	c.closed.Store(true)
	return c.Conn.Close()
}

// probe asks host-switch once and says what it found. With list, the
// question is the list of forwards, whose answer (the body, at most
// maxBody bytes; nil unless HTTP 200) it returns too: one request that is
// the probe and the check at once.
func (p *prober) probe(ctx context.Context, list bool) (probeResult, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	fresh, body, err := p.ask(ctx, list)
	if err != nil {
		// A connection that failed is not used again; drop any other so
		// the next probe starts afresh.
		p.client.CloseIdleConnections()
		if p.down {
			return probeStillDown, nil, err
		}
		p.down = true
		return probeFailed, nil, err
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
	return r, body, nil
}

// ask sends the probe's request (the list's, with list) and reports
// whether its answer came on a new connection, with the list's body.
func (p *prober) ask(ctx context.Context, list bool) (bool, []byte, error) {
	// net/http retries a GET that fails on a reused connection on a new
	// one, so the connection that carried the answer is the last one
	// reported.
	var reused atomic.Bool
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused.Store(i.Reused) }}
	url := p.url
	if list {
		url = p.listURL
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, url, nil)
	if err != nil {
		return false, nil, err
	}
	res, err := p.client.Do(req)
	if err != nil {
		return false, nil, err
	}
	// Read the answer to its end so that the connection is kept.
	var body []byte
	if list && res.StatusCode == http.StatusOK {
		body, err = io.ReadAll(io.LimitReader(res.Body, maxBody))
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxBody))
	res.Body.Close()
	if err != nil {
		return false, nil, err
	}
	if res.StatusCode >= 500 {
		// Not gvproxy's answer (it says 400 "post only" to the probe):
		// something in between answers for a host-switch that is not
		// there.
		return false, nil, fmt.Errorf("probe: HTTP %d from %s", res.StatusCode, url)
	}
	return !reused.Load(), body, nil
}

// close releases the probe's connection.
func (p *prober) close() { p.client.CloseIdleConnections() }
