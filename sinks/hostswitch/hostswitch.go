// Package hostswitch is the sink for host-switch's forwarder HTTP API (the
// gvisor-tap-vsock style expose/unexpose/all endpoints served on the virtual
// network's gateway). It exposes and unexposes one port at a time and lists
// the API's forwards for the router's reconcile; which forwards are this
// agent's, and which belong to others (gvproxy's SSH forward, host-switch's
// static forwards, a user's), is the router's ownership record's to say.
package hostswitch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
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

// API paths.
const (
	exposePath   = "/services/forwarder/expose"
	unexposePath = "/services/forwarder/unexpose"
	allPath      = "/services/forwarder/all"
)

func init() {
	registry.RegisterSink(registry.SinkPlugin{
		Name:    Name,
		Summary: "expose ports through host-switch's forwarder HTTP API",
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			base := fs.String("hostSwitchURL", DefaultBaseURL, "base URL of host-switch's forwarder API")
			guest := fs.String("hostSwitchGuestIP", DefaultGuestIP, "this guest's address on the virtual network: the remote end of every forward")
			probe := fs.Duration("hostSwitchProbeInterval", DefaultProbeInterval, "how often one small request on a connection kept open checks that host-switch is up and has not restarted; when it answers again or on a new connection (it restarted), its forwards are listed and restored at once (0 disables; at most 5s)")
			poll := fs.Duration("hostSwitchCheckInterval", DefaultCheckInterval, "how often the whole list of forwards is read, to restore forwards someone removed and take up ports others released; not while the probe has no answer from host-switch (0 disables)")
			return func(env registry.Env) (core.Sink, error) {
				return New(Config{BaseURL: *base, GuestIP: *guest, ProbeInterval: *probe, CheckInterval: *poll, Log: env.Log})
			}
		},
	})
}

// Config configures a Sink.
type Config struct {
	// BaseURL is where the API is served, e.g. http://192.168.127.1:80.
	BaseURL string
	// GuestIP is the remote address of every forward.
	GuestIP string
	// ProbeInterval is how often WatchPeer probes host-switch for a
	// restart (see DefaultProbeInterval); 0 disables, and it may not
	// exceed MaxProbeInterval.
	ProbeInterval time.Duration
	// CheckInterval is how often WatchPeer has the whole list of forwards
	// reconciled; 0 disables.
	CheckInterval time.Duration
	// Log receives the sink's log lines; nil discards them.
	Log *zap.Logger
	// Dial makes the connections to the API (from inside another network
	// namespace, say); nil dials directly.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Forward is one entry of the forwarder API.
type Forward struct {
	Local    string `json:"local"`
	Remote   string `json:"remote,omitempty"`
	Protocol string `json:"protocol"`
}

// Sink talks to the forwarder API.
type Sink struct {
	base   string
	guest  netip.Addr
	every  time.Duration // full checks
	log    *zap.Logger
	client *http.Client

	probeEvery time.Duration
	prober     *prober
	back       chan struct{} // PeerBack
}

// New checks cfg and returns a Sink.
func New(cfg Config) (*Sink, error) {
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
	tr := &http.Transport{
		Proxy:               nil, // the gateway is never reached through a proxy
		DialContext:         withTimeout(dial, 5*time.Second),
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	base := strings.TrimSuffix(cfg.BaseURL, "/")
	return &Sink{
		base:       base,
		guest:      guest,
		every:      cfg.CheckInterval,
		log:        cfg.Log.With(zap.String("sink", Name)),
		client:     &http.Client{Transport: tr},
		probeEvery: cfg.ProbeInterval,
		prober:     newProber(base, probeTimeout(cfg.ProbeInterval), withTimeout(dial, probeTimeout(cfg.ProbeInterval))),
		back:       make(chan struct{}, 1),
	}, nil
}

type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// withTimeout bounds each dial of dial by d.
func withTimeout(dial dialFunc, d time.Duration) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return dial(ctx, network, addr)
	}
}

// Close releases idle connections.
func (s *Sink) Close() error {
	s.client.CloseIdleConnections()
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
	var refused []error
	for _, p := range c.Mapping.Ports {
		f, err := s.forwardFor(p)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		if c.Remove {
			err = s.unexpose(ctx, f)
		} else {
			err = s.expose(ctx, f)
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

func (s *Sink) expose(ctx context.Context, f Forward) error {
	status, body, err := s.post(ctx, exposePath, f)
	if err != nil {
		return err
	}
	switch {
	case status == http.StatusOK:
		return nil
	case strings.Contains(body, "already running"):
		// Someone holds the address already; the list says with which
		// remote. Whether it is this agent's is the router's to know.
		all, err := s.Forwards(ctx)
		if err != nil {
			return err
		}
		for _, e := range all {
			if e.Local == f.Local && e.Protocol == f.Protocol {
				if e.Remote == f.Remote {
					return core.HeldElsewhere(fmt.Errorf("expose %s/%s: already forwarded to %s", f.Local, f.Protocol, e.Remote))
				}
				return core.Conflict(fmt.Errorf("expose %s/%s: already forwarded to %s, not %s", f.Local, f.Protocol, e.Remote, f.Remote))
			}
		}
		return fmt.Errorf("expose %s/%s: %q but not listed; will retry", f.Local, f.Protocol, body)
	default:
		return apiError("expose", f, status, body)
	}
}

func (s *Sink) unexpose(ctx context.Context, f Forward) error {
	status, body, err := s.post(ctx, unexposePath, Forward{Local: f.Local, Protocol: f.Protocol})
	if err != nil {
		return err
	}
	if status == http.StatusOK || strings.Contains(body, "not found") {
		return nil
	}
	return apiError("unexpose", f, status, body)
}

func apiError(op string, f Forward, status int, body string) error {
	err := fmt.Errorf("%s %s/%s: HTTP %d: %s", op, f.Local, f.Protocol, status, body)
	if status >= 400 && status < 500 {
		return core.Permanent(err)
	}
	return err
}

// maxBody bounds what is read of an answer.
const maxBody = 16 << 20

func (s *Sink) post(ctx context.Context, path string, f Forward) (int, string, error) {
	payload, err := json.Marshal(f)
	if err != nil {
		return 0, "", core.Permanent(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+path, bytes.NewReader(payload))
	if err != nil {
		return 0, "", core.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := s.client.Do(req)
	if err != nil {
		return 0, "", transportError(ctx, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 4096))
	if err != nil {
		return 0, "", fmt.Errorf("%s: reading answer: %w", path, err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxBody))
	s.log.Debug("forwarder API", zap.String("path", path), zap.Any("request", f), zap.Int("status", res.StatusCode), zap.ByteString("answer", bytes.TrimSpace(body)))
	return res.StatusCode, strings.TrimSpace(string(body)), nil
}

func transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return err
	}
	return core.PeerDown(err)
}

// Forwards returns the forwards the API reports.
func (s *Sink) Forwards(ctx context.Context) ([]Forward, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+allPath, nil)
	if err != nil {
		return nil, err
	}
	res, err := s.client.Do(req)
	if err != nil {
		return nil, transportError(ctx, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		return nil, fmt.Errorf("list forwards: HTTP %d: %s", res.StatusCode, bytes.TrimSpace(body))
	}
	all, err := DecodeForwards(res.Body)
	// Read what follows the list (a newline, say) so the connection is
	// reused rather than closed.
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, maxBody))
	return all, err
}

// DecodeForwards reads the API's answer to a list request: a JSON list of
// forwards, at most maxBody bytes of it.
func DecodeForwards(r io.Reader) ([]Forward, error) {
	var all []Forward
	if err := json.NewDecoder(io.LimitReader(r, maxBody)).Decode(&all); err != nil {
		return nil, fmt.Errorf("list forwards: answer is not a JSON list of forwards: %w", err)
	}
	return all, nil
}

// List returns the API's forwards as ports, for the router's reconcile. A
// forward matches when it leads to the guest's same port, as the ones this
// sink creates do; forwards whose local address cannot be read are left
// out (they are nobody's port the agent could want).
func (s *Sink) List(ctx context.Context) ([]core.Held, error) {
	all, err := s.Forwards(ctx)
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

// WatchPeer probes host-switch every ProbeInterval and asks the router to
// reconcile (one list of the forwards) when it answers again after failing
// or answers on a new connection: it restarted and lost the forwards this
// agent made. Every CheckInterval it asks for a reconcile too, so that
// forwards someone else removed come back and ports others release are
// taken up; while the probe has no answer from host-switch it does not
// (the router retries on its own then, and the probe says when it is
// back).
func (s *Sink) WatchPeer(ctx context.Context, check func()) {
	var probe, full <-chan time.Time
	if s.probeEvery > 0 {
		t := time.NewTicker(s.probeEvery)
		defer t.Stop()
		probe = t.C
		// The first answer is what later ones are told from: get it
		// now, before the router's first adds.
		s.probe(ctx, check)
	}
	if s.every > 0 {
		t := time.NewTicker(s.every)
		defer t.Stop()
		full = t.C
	}
	if probe == nil && full == nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-full:
			if probe == nil || s.prober.up() {
				check()
			}
		case <-probe:
			s.probe(ctx, check)
		}
	}
}

// probe probes host-switch once and asks for a check when it restarted or
// is back.
func (s *Sink) probe(ctx context.Context, check func()) {
	res, err := s.prober.probe(ctx)
	if ctx.Err() != nil {
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
	s.client.CloseIdleConnections()
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
	_ core.Sink        = (*Sink)(nil)
	_ core.Lister      = (*Sink)(nil)
	_ core.PortFilter  = (*Sink)(nil)
	_ core.PeerWatcher = (*Sink)(nil)

	_ core.PeerBackNotifier = (*Sink)(nil)
)
