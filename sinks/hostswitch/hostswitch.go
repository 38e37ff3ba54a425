// Package hostswitch is the sink for host-switch's forwarder HTTP API (the
// gvisor-tap-vsock style expose/unexpose/all endpoints served on the virtual
// network's gateway). It tracks what it exposed per mapping key, so a port
// shared by two keys stays exposed until both are gone, and it reconciles
// against the API's list of forwards after restarts.
package hostswitch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sinks/internal/peerwatch"
)

// Defaults of the seed's virtual network.
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
	registry.RegisterSink(registry.Sink{
		Name:    core.SinkHostSwitch,
		Summary: "expose ports through host-switch's forwarder HTTP API",
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			base := fs.String("hostSwitchURL", DefaultBaseURL, "base URL of host-switch's forwarder API")
			guest := fs.String("hostSwitchGuestIP", DefaultGuestIP, "this guest's address on the virtual network: the remote end of every forward")
			poll := fs.Duration("hostSwitchCheckInterval", 5*time.Second, "how often the API's list of forwards is checked for lost state (0 disables)")
			return func(env registry.Env) (core.Sink, error) {
				return New(Config{BaseURL: *base, GuestIP: *guest, CheckInterval: *poll, Log: env.Log})
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
	// CheckInterval is how often WatchPeer lists the forwards; 0 disables.
	CheckInterval time.Duration
	// Log receives the sink's log lines; nil discards them.
	Log *zap.Logger
}

// Forward is one entry of the forwarder API.
type Forward struct {
	Local    string `json:"local"`
	Remote   string `json:"remote,omitempty"`
	Protocol string `json:"protocol"`
}

type fwdKey struct {
	local, proto string
}

// Sink talks to the forwarder API.
type Sink struct {
	base   string
	guest  netip.Addr
	every  time.Duration
	log    *zap.Logger
	client *http.Client

	mu     sync.Mutex
	owners map[fwdKey]map[core.Key]bool // keys that want each forward
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
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	tr := &http.Transport{
		Proxy:               nil, // the gateway is never reached through a proxy
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	return &Sink{
		base:   strings.TrimSuffix(cfg.BaseURL, "/"),
		guest:  guest,
		every:  cfg.CheckInterval,
		log:    cfg.Log.With(zap.String("sink", core.SinkHostSwitch)),
		client: &http.Client{Transport: tr},
		owners: map[fwdKey]map[core.Key]bool{},
	}, nil
}

// Close releases idle connections.
func (s *Sink) Close() error {
	s.client.CloseIdleConnections()
	return nil
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
		return Forward{}, fmt.Errorf("%s: the forwarder API is IPv4 only; IPv6 binding not exposed", p)
	}
	port := strconv.Itoa(int(p.HostPort))
	return Forward{
		Local:    net.JoinHostPort(ip.Unmap().String(), port),
		Remote:   net.JoinHostPort(s.guest.String(), port),
		Protocol: string(p.Protocol),
	}, nil
}

// Send exposes or unexposes the ports of c. Ports the API cannot take are
// reported as a permanent error after the others are done.
func (s *Sink) Send(ctx context.Context, c core.Change) error {
	var refused []error
	for _, p := range c.Mapping.Ports {
		f, err := s.forwardFor(p)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		if c.Remove {
			err = s.release(ctx, c.Mapping.Key, f)
		} else {
			err = s.claim(ctx, c.Mapping.Key, f)
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

// claim exposes f for key. The expose is sent even when another key holds
// f already, so that a replay after a peer restart restores it.
func (s *Sink) claim(ctx context.Context, k core.Key, f Forward) error {
	if err := s.expose(ctx, f); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fk := fwdKey{f.Local, f.Protocol}
	if s.owners[fk] == nil {
		s.owners[fk] = map[core.Key]bool{}
	}
	s.owners[fk][k] = true
	return nil
}

// release drops key's claim on f and unexposes f once nobody holds it.
func (s *Sink) release(ctx context.Context, k core.Key, f Forward) error {
	fk := fwdKey{f.Local, f.Protocol}
	s.mu.Lock()
	others := 0
	for o := range s.owners[fk] {
		if o != k {
			others++
		}
	}
	s.mu.Unlock()
	if others > 0 {
		s.log.Debug("forward still wanted by another mapping; kept", zap.String("local", f.Local), zap.Stringer("key", k))
	} else if err := s.unexpose(ctx, f); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.owners[fk], k)
	if len(s.owners[fk]) == 0 {
		delete(s.owners, fk)
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
		// Fine if it is the same forward (a replay); a different remote
		// means another party holds the address.
		all, err := s.List(ctx)
		if err != nil {
			return err
		}
		for _, e := range all {
			if e.Local == f.Local && e.Protocol == f.Protocol {
				if e.Remote == f.Remote {
					return nil
				}
				return core.Permanent(fmt.Errorf("expose %s/%s: already forwarded to %s, not %s", f.Local, f.Protocol, e.Remote, f.Remote))
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

// List returns the forwards the API reports.
func (s *Sink) List(ctx context.Context) ([]Forward, error) {
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

// ours reports whether f looks like a forward this agent made: to the guest
// address, on the same port it listens on. Other parties' forwards (the SSH
// forward to port 22, say) do not match and are never touched.
func (s *Sink) ours(f Forward) bool {
	_, localPort, err := net.SplitHostPort(f.Local)
	if err != nil {
		return false
	}
	remote, err := netip.ParseAddrPort(f.Remote)
	return err == nil && remote.Addr() == s.guest && localPort == strconv.Itoa(int(remote.Port()))
}

// Sync makes the API's forwards match desired: it exposes what is missing
// and unexposes what this agent left behind.
func (s *Sink) Sync(ctx context.Context, desired []core.Mapping) error {
	all, err := s.List(ctx)
	if err != nil {
		return err
	}
	want := map[fwdKey]Forward{}
	owners := map[fwdKey]map[core.Key]bool{}
	var refused []error
	for _, m := range desired {
		for _, p := range m.Ports {
			f, err := s.forwardFor(p)
			if err != nil {
				refused = append(refused, err)
				continue
			}
			fk := fwdKey{f.Local, f.Protocol}
			want[fk] = f
			if owners[fk] == nil {
				owners[fk] = map[core.Key]bool{}
			}
			owners[fk][m.Key] = true
		}
	}
	have := map[fwdKey]Forward{}
	for _, e := range all {
		have[fwdKey{e.Local, e.Protocol}] = e
	}
	for _, fk := range slices.SortedFunc(maps.Keys(have), compareFwd) {
		e := have[fk]
		w, wanted := want[fk]
		if !s.ours(e) || (wanted && w.Remote == e.Remote) {
			continue
		}
		s.log.Info("unexposing leftover forward", zap.String("local", e.Local), zap.String("remote", e.Remote), zap.String("protocol", e.Protocol))
		if err := s.unexpose(ctx, e); err != nil {
			return err
		}
		delete(have, fk)
	}
	for _, fk := range slices.SortedFunc(maps.Keys(want), compareFwd) {
		if _, ok := have[fk]; ok {
			continue
		}
		if err := s.expose(ctx, want[fk]); err != nil && !errors.Is(err, core.ErrPermanent) {
			return err
		} else if err != nil {
			refused = append(refused, err)
		}
	}
	s.mu.Lock()
	s.owners = owners
	s.mu.Unlock()
	for _, err := range refused {
		s.log.Warn("port not exposed", zap.Error(err))
	}
	return nil
}

func compareFwd(a, b fwdKey) int {
	if c := strings.Compare(a.local, b.local); c != 0 {
		return c
	}
	return strings.Compare(a.proto, b.proto)
}

// WatchPeer lists the forwards every CheckInterval and reports a lost peer
// when one this sink holds is missing, or when the API answers again after
// being unreachable.
func (s *Sink) WatchPeer(ctx context.Context, lost func()) {
	peerwatch.Run(ctx, s.every, s.log, "forwarder API", func(ctx context.Context) (bool, error) {
		all, err := s.List(ctx)
		if err != nil {
			return false, err
		}
		return s.missing(all), nil
	}, lost)
}

// missing reports whether a forward this sink holds is not in all.
func (s *Sink) missing(all []Forward) bool {
	have := make(map[fwdKey]bool, len(all))
	for _, e := range all {
		have[fwdKey{e.Local, e.Protocol}] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for fk := range s.owners {
		if !have[fk] {
			return true
		}
	}
	return false
}
