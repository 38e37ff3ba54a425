// Package hostswitch is the sink for host-switch's forwarder HTTP API (the
// gvisor-tap-vsock style expose/unexpose/all endpoints served on the virtual
// network's gateway). It exposes and unexposes one port at a time and lists
// the API's forwards for the router's reconcile; which forwards are this
// agent's, and which belong to others (gvproxy's SSH forward, host-switch's
// static forwards, a user's), is the router's ownership record's to say.
// A probe on a connection kept open notices a restarted host-switch, which
// has lost every forward, and has the router restore them at once.
//
// client.go speaks the API (requests, and what each answer means); probe.go
// is the restart probe; this file is the sink: which forward a port makes
// and which listed forwards match the agent's.
package hostswitch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the sink's registry name.
const Name = "host-switch"

// Defaults of Rancher Desktop's virtual network.
const (
	DefaultBaseURL = "http://192.168.127.1:80"
	DefaultGuestIP = "192.168.127.2"
)

func init() {
	registry.RegisterSink(registry.SinkPlugin{
		Name:    Name,
		Summary: "expose ports through host-switch's forwarder HTTP API",
		// Every mode but the privileged service's goes through host-switch.
		Auto:           func(o registry.Options) bool { return o.Mode != core.ModePrivileged },
		HostPorts:      true,
		GuestAddrFlags: []string{"hostSwitchGuestIP"},
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.BaseURL, "hostSwitchURL", DefaultBaseURL, "base URL of host-switch's forwarder API")
			registry.NonEmptyStringVar(fs, &cfg.GuestIP, "hostSwitchGuestIP", DefaultGuestIP, "this guest's address on the virtual network: the remote end of every forward")
			fs.DurationVar(&cfg.ProbeInterval, "hostSwitchProbeInterval", DefaultProbeInterval, "how often one small request on a connection kept open checks that host-switch is up and has not restarted (at once when that connection breaks, every 200ms while host-switch does not answer); when it answers again or on a new connection (it restarted), its forwards are listed and restored at once (0 disables; at most 5s)")
			fs.DurationVar(&cfg.CheckInterval, "hostSwitchCheckInterval", DefaultCheckInterval, "how often the whole list of forwards is read (as the probe of that turn), to restore forwards someone removed and take up ports others released; a reconcile follows only when the list changed; not while the probe has no answer from host-switch (0 disables)")
			return func(env registry.Env) (core.Sink, error) {
				c := cfg
				c.Log = env.Log
				return New(c)
			}
		},
	})
}

// Config configures a Sink; a zero field means its default, except where
// the field says that zero turns something off.
type Config struct {
	// BaseURL is where the API is served, an http or https URL
	// (--hostSwitchURL); empty means DefaultBaseURL.
	BaseURL string
	// GuestIP is the remote address of every forward, IPv4
	// (--hostSwitchGuestIP); empty means DefaultGuestIP.
	GuestIP string
	// ProbeInterval is how often WatchPeer probes host-switch for a
	// restart (--hostSwitchProbeInterval, whose default is
	// DefaultProbeInterval); 0 disables the probe, and it may be neither
	// negative nor more than MaxProbeInterval.
	ProbeInterval time.Duration
	// CheckInterval is how often WatchPeer has the whole list of forwards
	// reconciled (--hostSwitchCheckInterval, whose default is
	// DefaultCheckInterval); 0 disables the check, and it may not be
	// negative.
	CheckInterval time.Duration
	// Log receives the sink's log lines; nil discards them.
	Log *zap.Logger
	// Dial makes the connections to the API (from inside another network
	// namespace, say); nil dials directly.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Sink talks to the forwarder API. Send, List and WatchPeer may run at
// once; Close releases its connections once they have returned.
type Sink struct {
	api   *client
	guest netip.Addr
	every time.Duration // full checks
	log   *zap.Logger

	probeEvery time.Duration
	prober     *prober       // used by WatchPeer alone
	back       chan struct{} // PeerBack

	sends atomic.Uint64 // Sends begun: each may change the list

	mu sync.Mutex
	// given is the list List last returned (its body's hash, and the
	// Sends begun before it was read): a check that reads the same, with
	// no Send since, has nothing to tell the router.
	given listMark
	// read is a list a check read and asked the router to reconcile
	// with: List returns it instead of asking again, while no Send
	// began since and it is fresh.
	read     []Forward
	readMark listMark
	readAt   time.Time
}

// listMark says which list a reconcile saw: the hash of the API's answer
// and the count of Sends begun before it was asked for.
type listMark struct {
	sum   uint64
	sends uint64
	ok    bool
}

// readFresh is how long a list a check read stands for the API's, for the
// List that the check's reconcile makes.
const readFresh = 2 * time.Second

// mark returns the listMark of body, read after sends Sends began.
func mark(body []byte, sends uint64) listMark {
	h := fnv.New64a()
	_, _ = h.Write(body)
	return listMark{sum: h.Sum64(), sends: sends, ok: true}
}

// New checks cfg and returns a Sink.
func New(cfg Config) (*Sink, error) {
	if cfg.BaseURL == "" {
		cfg.BaseURL = DefaultBaseURL
	}
	if cfg.GuestIP == "" {
		cfg.GuestIP = DefaultGuestIP
	}
	u, err := url.Parse(cfg.BaseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--hostSwitchURL %q is not an http(s) URL", cfg.BaseURL)
	}
	guest, err := netip.ParseAddr(cfg.GuestIP)
	if err != nil || !guest.Is4() {
		return nil, fmt.Errorf("--hostSwitchGuestIP %q is not an IPv4 address", cfg.GuestIP)
	}
	if cfg.CheckInterval < 0 {
		return nil, fmt.Errorf("--hostSwitchCheckInterval must not be negative, got %s", cfg.CheckInterval)
	}
	if cfg.ProbeInterval < 0 || cfg.ProbeInterval > MaxProbeInterval {
		return nil, fmt.Errorf("--hostSwitchProbeInterval must be between 0 (off) and %s (gvproxy closes connections idle for 10s), got %s", MaxProbeInterval, cfg.ProbeInterval)
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	dial := cfg.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	log := cfg.Log.With(zap.String("sink", Name))
	base := strings.TrimSuffix(cfg.BaseURL, "/")
	return &Sink{
		api:        newClient(base, dial, log),
		guest:      guest,
		every:      cfg.CheckInterval,
		log:        log,
		probeEvery: cfg.ProbeInterval,
		prober:     newProber(base, probeTimeout(cfg.ProbeInterval), withTimeout(dial, probeTimeout(cfg.ProbeInterval))),
		back:       make(chan struct{}, 1),
	}, nil
}

// Close closes the connections the sink keeps open to the API, the
// probe's among them. Call it once Send, List and WatchPeer have
// returned; a Sink that never sent anything may be closed too.
func (s *Sink) Close() error {
	s.api.closeIdle()
	s.prober.close()
	return nil
}

// Supports reports whether p can go through the API: tcp or udp on an
// IPv4 address.
func (s *Sink) Supports(p core.Port) error {
	_, err := s.forwardFor(p)
	return err
}

// forwardFor returns the forward that exposes p, or an error saying why p
// cannot go through this API.
func (s *Sink) forwardFor(p core.Port) (Forward, error) {
	if p.Protocol != core.TCP && p.Protocol != core.UDP {
		return Forward{}, fmt.Errorf("%s: the forwarder API handles tcp and udp only", p)
	}
	ip := p.HostIP
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	if !ip.Unmap().Is4() {
		return Forward{}, fmt.Errorf("%s: the forwarder API is IPv4 only", p)
	}
	port := strconv.Itoa(int(p.HostPort))
	return Forward{
		Local:    net.JoinHostPort(ip.Unmap().String(), port),
		Remote:   net.JoinHostPort(s.guest.String(), port),
		Protocol: string(p.Protocol),
	}, nil
}

// Send exposes or unexposes the ports of c (the router sends one at a
// time). Ports the API cannot take are reported as a permanent error after
// the others are done.
func (s *Sink) Send(ctx context.Context, c core.Change) error {
	s.sends.Add(1)
	var refused []error
	for _, p := range c.Mapping.Ports {
		f, err := s.forwardFor(p)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		if c.Remove {
			err = s.api.unexpose(ctx, f)
		} else {
			err = s.api.expose(ctx, f)
		}
		if err != nil {
			return err
		}
	}
	if len(refused) > 0 {
		return core.Permanent(errors.Join(refused...))
	}
	return nil
}

// Forwards returns the forwards the API reports.
func (s *Sink) Forwards(ctx context.Context) ([]Forward, error) {
	return s.api.forwards(ctx)
}

// List returns the API's forwards as ports, for the router's reconcile. A
// forward matches when it leads to the guest's same port, as the ones this
// sink creates do; forwards whose local address cannot be read are left
// out (they are nobody's port the agent could want).
//
// Right after a check that read the list (and asked for this reconcile),
// that list is used rather than asked for again.
func (s *Sink) List(ctx context.Context) ([]core.Held, error) {
	all, err := s.list(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]core.Held, 0, len(all))
	for _, f := range all {
		p, ok := parseLocal(f)
		if !ok {
			continue
		}
		want, err := s.forwardFor(p)
		out = append(out, core.Held{Port: p, Target: f.Remote, Matches: err == nil && want.Remote == f.Remote})
	}
	return out, nil
}

// list returns the API's forwards for a reconcile: the ones a check just
// read when nothing was sent since, else a new list.
func (s *Sink) list(ctx context.Context) ([]Forward, error) {
	s.mu.Lock()
	all, m := s.read, s.readMark
	fresh := all != nil && m.sends == s.sends.Load() && time.Since(s.readAt) < readFresh
	s.read = nil
	if fresh {
		s.given = m
	}
	s.mu.Unlock()
	if fresh {
		return all, nil
	}
	sends := s.sends.Load()
	all, body, err := s.api.list(ctx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.given = mark(body, sends)
	s.mu.Unlock()
	return all, nil
}

// changed reports whether the list in body, read after sends Sends
// began, may differ from what the router last reconciled with; if so, it
// keeps the list for the reconcile it asks for.
func (s *Sink) changed(body []byte, sends uint64) bool {
	m := mark(body, sends)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.given.ok && s.given.sum == m.sum && s.given.sends == m.sends {
		return false
	}
	all, err := DecodeForwards(bytes.NewReader(body))
	if err != nil {
		return true // the reconcile's own list says what is wrong
	}
	if all == nil {
		all = []Forward{}
	}
	s.read, s.readMark, s.readAt = all, m, time.Now()
	return true
}

// parseLocal reads a forward's local address ("127.0.0.1:80", or ":80"
// for all addresses) and protocol (tcp when empty, as the API defaults).
func parseLocal(f Forward) (core.Port, bool) {
	host, portText, err := net.SplitHostPort(f.Local)
	if err != nil {
		return core.Port{}, false
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil || port == 0 {
		return core.Port{}, false
	}
	ip := netip.IPv4Unspecified()
	if host != "" {
		if ip, err = netip.ParseAddr(host); err != nil {
			return core.Port{}, false
		}
	}
	proto, err := core.ParseProtocol(f.Protocol)
	if err != nil {
		return core.Port{}, false
	}
	return core.Port{Protocol: proto, HostIP: ip.Unmap(), HostPort: uint16(port)}, true
}

// WatchPeer probes host-switch every ProbeInterval (and at once when the
// probe's kept connection breaks; every downProbeInterval while it does
// not answer) and asks the router to reconcile (one list of the forwards)
// when it answers again after failing or answers on a new connection: it
// restarted and lost the forwards this agent made.
//
// Every CheckInterval the list of forwards is read, so that forwards
// someone else removed come back and ports others release are taken up:
// with the probe on, that read is the probe of its turn, over the probe's
// connection, so that each interval costs one request. The router is
// asked to reconcile only when the list differs from the one it last
// reconciled with, or the sink sent something since; it then gets the
// list just read. While the probe has no answer from host-switch no list
// is read (the router retries on its own then, and the probe says when it
// is back).
func (s *Sink) WatchPeer(ctx context.Context, check func()) {
	if s.probeEvery <= 0 {
		s.watchLists(ctx, check)
		return
	}
	probeTimer := time.NewTimer(s.probeEvery)
	defer probeTimer.Stop()
	// The first answer is what later ones are told from: get it now,
	// before the router's first adds.
	s.probe(ctx, check, false)
	lastList := time.Now()
	probeTimer.Reset(s.nextProbe())
	for {
		select {
		case <-ctx.Done():
			return
		case <-probeTimer.C:
		case <-s.prober.lost:
			s.log.Debug("the probe's connection to host-switch broke; probing now")
		}
		// A probe less than a tenth of the interval early is on time.
		list := s.every > 0 && s.prober.up() && time.Since(lastList) >= s.every-s.every/10
		if list {
			lastList = time.Now()
		}
		s.probe(ctx, check, list)
		if !probeTimer.Stop() {
			select {
			case <-probeTimer.C:
			default:
			}
		}
		probeTimer.Reset(s.nextProbe())
	}
}

// watchLists reads the list every CheckInterval, when the probe is off.
func (s *Sink) watchLists(ctx context.Context, check func()) {
	if s.every <= 0 {
		return
	}
	t := time.NewTicker(s.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sends := s.sends.Load()
		_, body, err := s.api.list(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil || s.changed(body, sends) {
			check() // the reconcile's list reports the error
		}
	}
}

// nextProbe is the time until the next probe: ProbeInterval while
// host-switch answers, downProbeInterval (at most ProbeInterval) while it
// does not.
func (s *Sink) nextProbe() time.Duration {
	if s.prober.up() {
		return s.probeEvery
	}
	return min(s.probeEvery, downProbeInterval)
}

// probe probes host-switch once and asks for a check when it restarted or
// is back; with list, the probe reads the list of forwards, and asks for
// a check when that changed too.
func (s *Sink) probe(ctx context.Context, check func(), list bool) {
	sends := s.sends.Load()
	res, body, err := s.prober.probe(ctx, list)
	if ctx.Err() != nil {
		return
	}
	if list && (res == probeSame || res == probeFirst) {
		if body == nil || s.changed(body, sends) {
			check() // a list that is not HTTP 200: the reconcile's says why
		}
		return
	}
	switch res {
	case probeFailed:
		s.log.Warn("host-switch not answering", zap.Error(err))
	case probeBack:
		s.log.Info("host-switch answers again; restoring its forwards")
		s.peerBack(check)
	case probeNew:
		s.log.Info("host-switch answered on a new connection (it restarted); restoring its forwards")
		s.peerBack(check)
	}
}

// peerBack tells the router that host-switch may have lost its forwards.
func (s *Sink) peerBack(check func()) {
	// Connections made before the restart lead nowhere: on the virtual
	// network they are only reset at their next request, which an
	// expose (not retried by net/http) would fail with.
	s.api.closeIdle()
	select {
	case s.back <- struct{}{}:
	default:
	}
	check()
}

// PeerBack delivers a value when the probe finds host-switch back after
// failing or restarted, so that the router ends its backoff at once.
func (s *Sink) PeerBack() <-chan struct{} { return s.back }

// Interface guards.
var (
	_ core.Sink             = (*Sink)(nil)
	_ core.Lister           = (*Sink)(nil)
	_ core.PortFilter       = (*Sink)(nil)
	_ core.PeerWatcher      = (*Sink)(nil)
	_ core.PeerBackNotifier = (*Sink)(nil)
	_ io.Closer             = (*Sink)(nil)
)
