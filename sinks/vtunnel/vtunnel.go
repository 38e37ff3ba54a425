// Package vtunnel is the sink of the privileged-service mode: each change
// goes as one PortMapping JSON document to the vtunnel peer, which carries
// it over AF_VSOCK to the privileged host service. The peer address is a
// TCP address in the guest (as Rancher Desktop runs it) or, to talk
// AF_VSOCK directly, vsock://CID:PORT. The peer never answers and cannot
// be listed: a send that cannot connect or write marks the peer down, and
// an empty connection at every check interval notices it come back after
// failing, when it may have restarted without its state and the router
// sends every port again.
package vtunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sinks/internal/oneshot"
	"github.com/guestagent/guestagent/sinks/internal/peerwatch"
	"github.com/guestagent/guestagent/wire"
)

// Name is the sink's registry name.
const Name = "vtunnel"

// Defaults as Rancher Desktop uses them.
const (
	DefaultAddr      = "127.0.0.1:3040"
	DefaultInterface = "eth0"
)

// DefaultCheckInterval is the --vtunnelCheckInterval default.
const DefaultCheckInterval = 5 * time.Second

func init() {
	registry.RegisterSink(registry.SinkPlugin{
		Name:      Name,
		Summary:   "send mappings to the vtunnel peer, which carries them over AF_VSOCK to the privileged host service",
		Auto:      func(o registry.Options) bool { return o.Mode == core.ModePrivileged },
		HostPorts: true,
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.Addr, "vtunnelAddr", DefaultAddr, "vtunnel peer address: HOST:PORT (TCP) or vsock://CID:PORT")
			fs.StringVar(&cfg.Interface, "vtunnelInterface", DefaultInterface, `interface whose addresses the host service connects to ("" keeps each mapping's own backend addresses)`)
			fs.DurationVar(&cfg.CheckInterval, "vtunnelCheckInterval", DefaultCheckInterval, "how often the peer is probed so a restarted one gets the full state again (0 disables)")
			return func(env registry.Env) (core.Sink, error) {
				c := cfg
				c.Log = env.Log
				return New(c)
			}
		},
	})
}

// Config configures a Sink; a zero field means its default, except where
// the field says that zero (or "") turns something off.
type Config struct {
	// Addr is the peer (--vtunnelAddr; empty means DefaultAddr):
	// "HOST:PORT" or "tcp://HOST:PORT" for TCP, "vsock://CID:PORT" (in
	// decimal) for AF_VSOCK; see Dialer.
	Addr string
	// Interface names the interface whose addresses are sent as every
	// mapping's connectAddrs, where the host service connects to
	// (--vtunnelInterface, whose default is DefaultInterface); "" keeps
	// each mapping's own.
	Interface string
	// CheckInterval is how often WatchPeer opens an empty connection to
	// the peer, to notice a restarted one (--vtunnelCheckInterval, whose
	// default is DefaultCheckInterval); 0 disables the check, and it may
	// not be negative.
	CheckInterval time.Duration
	// Log receives the sink's log lines; nil discards them.
	Log *zap.Logger
}

// Sink sends to the vtunnel peer. It holds no connection between calls:
// each Send and each check opens its own and closes it before returning,
// so there is nothing to close.
type Sink struct {
	dial  oneshot.Dialer
	addr  string
	iface string
	every time.Duration
	log   *zap.Logger

	warnOnce sync.Once
}

// New checks cfg and returns a Sink.
func New(cfg Config) (*Sink, error) {
	if cfg.CheckInterval < 0 {
		return nil, fmt.Errorf("--vtunnelCheckInterval must not be negative, got %s", cfg.CheckInterval)
	}
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	dial, err := Dialer(cfg.Addr)
	if err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	return &Sink{
		dial:  dial,
		addr:  cfg.Addr,
		iface: cfg.Interface,
		every: cfg.CheckInterval,
		log:   cfg.Log.With(zap.String("sink", Name)),
	}, nil
}

// Dialer returns how to reach addr: "HOST:PORT" or "tcp://HOST:PORT" for
// TCP, "vsock://CID:PORT" for AF_VSOCK.
func Dialer(addr string) (oneshot.Dialer, error) {
	scheme, rest, found := strings.Cut(addr, "://")
	if !found {
		scheme, rest = "tcp", addr
	}
	switch scheme {
	case "tcp":
		if _, _, err := net.SplitHostPort(rest); err != nil {
			return nil, fmt.Errorf("--vtunnelAddr %q: %w", addr, err)
		}
		return func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", rest)
		}, nil
	case "vsock":
		cidText, portText, ok := strings.Cut(rest, ":")
		cid, err1 := strconv.ParseUint(cidText, 10, 32)
		port, err2 := strconv.ParseUint(portText, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("--vtunnelAddr %q: want vsock://CID:PORT with decimal numbers", addr)
		}
		return func(ctx context.Context) (net.Conn, error) {
			return vsock.DialContext(ctx, uint32(cid), uint32(port), nil)
		}, nil
	default:
		return nil, fmt.Errorf("--vtunnelAddr %q: unknown scheme %q (want tcp or vsock)", addr, scheme)
	}
}

// Send delivers c as one PortMapping, with the interface's addresses as
// the backend when an interface is configured.
func (s *Sink) Send(ctx context.Context, c core.Change) error {
	pm := wire.FromChange(c)
	if s.iface != "" {
		addrs, err := InterfaceAddrs(s.iface)
		if err != nil {
			s.warnOnce.Do(func() {
				s.log.Warn("cannot read the interface's addresses; sending mappings' own backends", zap.String("interface", s.iface), zap.Error(err))
			})
		} else {
			pm.ConnectAddrs = addrs
		}
	}
	if err := oneshot.Send(ctx, s.dial, pm); err != nil {
		return fmt.Errorf("vtunnel peer %s: %w", s.addr, err)
	}
	return nil
}

// InterfaceAddrs returns the addresses of the named interface in the form
// the privileged host service expects ({"network":"ip+net","addr":"IP/LEN"}).
func InterfaceAddrs(name string) ([]core.ConnectAddr, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return nil, err
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, errors.New("interface has no addresses")
	}
	out := make([]core.ConnectAddr, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, core.ConnectAddr{Network: a.Network(), Addr: a.String()})
	}
	return out, nil
}

// WatchPeer probes the peer with a connection every interval; when it
// answers again after failing, it may have restarted without its state.
func (s *Sink) WatchPeer(ctx context.Context, lost func()) {
	peerwatch.Run(ctx, s.every, s.log.With(zap.String("addr", s.addr)), "vtunnel peer", func(ctx context.Context) (bool, error) {
		conn, err := s.dial(ctx)
		if err != nil {
			return false, err
		}
		_ = conn.Close()
		return false, nil
	}, lost)
}

// PeerKeying is ByPort: the privileged host service listens on the host's
// every address, one listener per port.
func (s *Sink) PeerKeying() core.PeerKeying { return core.ByPort }

// Interface guards.
var (
	_ core.Sink        = (*Sink)(nil)
	_ core.Keyer       = (*Sink)(nil)
	_ core.PeerWatcher = (*Sink)(nil)
)
