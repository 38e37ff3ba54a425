// Package wslproxy is the sink for wsl-proxy: each change goes as one
// PortMapping JSON document over wsl-proxy's unix socket, and wsl-proxy
// listens (or stops listening) on the binding in the default namespace so
// other WSL distributions can reach the port. wsl-proxy never answers and
// cannot be listed: a send that cannot connect or write marks it down,
// and a look at the socket file whenever its directory changes notices a
// restarted wsl-proxy (a new socket), which has lost every port, so that
// the router sends them all again at once.
//
// wsl-proxy handles each connection in a goroutine of its own and closes
// it once it has applied the message. Two messages sent back to back (the
// remove of a port and the add that follows it) could be applied in
// either order, and an add that comes first fails on the port still open
// and is then undone by the remove. So each send waits for wsl-proxy to
// close its connection (AppliedWait at most) before it returns, and the
// router sends the next change only then.
package wslproxy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sinks/internal/oneshot"
	"github.com/guestagent/guestagent/wire"
)

// Name is the sink's registry name.
const Name = "wsl-proxy"

// DefaultSocket is where wsl-proxy listens.
const DefaultSocket = "/run/wsl-proxy.sock"

// DefaultCheckInterval is the --wslProxyCheckInterval default.
const DefaultCheckInterval = 2 * time.Second

// Defaults of wsl-proxy's upstream, the entry of its traffic into the
// guest: Rancher Desktop's veth pair between WSL's default namespace and
// the agent's.
const (
	DefaultUpstreamInterface = "veth-rd-ns"
	DefaultUpstreamAddr      = "192.168.143.1"
)

// AppliedWait bounds how long a send waits for wsl-proxy to close the
// connection, its sign that it applied the message. wsl-proxy closes it
// as soon as it has opened or closed the listener; a send that runs out of
// this time fails and is tried again.
const AppliedWait = 5 * time.Second

func init() {
	registry.RegisterSink(registry.SinkPlugin{
		Name:    Name,
		Summary: "send mappings to wsl-proxy so other WSL distributions reach the ports",
		// With WSL integration, in every mode but the privileged service's.
		Auto: func(o registry.Options) bool { return o.WSLIntegration && o.Mode != core.ModePrivileged },
		Setup: func(fs *pflag.FlagSet) registry.SinkFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.Socket, "wslProxySocket", DefaultSocket, "wsl-proxy's unix socket")
			fs.DurationVar(&cfg.CheckInterval, "wslProxyCheckInterval", DefaultCheckInterval, "how often the socket is checked for a restarted wsl-proxy where its directory cannot be watched with inotify (0 disables the check)")
			fs.StringVar(&cfg.UpstreamInterface, "wslProxyUpstreamInterface", DefaultUpstreamInterface, "this namespace's interface toward wsl-proxy, where its connections come in; ports bound to 127.0.0.1 are opened there too (empty with --wslProxyUpstreamAddr empty: none)")
			fs.StringVar(&cfg.UpstreamAddr, "wslProxyUpstreamAddr", DefaultUpstreamAddr, "this namespace's address on that interface, which wsl-proxy forwards each port to (empty: none)")
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
	// Socket is wsl-proxy's unix socket (--wslProxySocket); empty means
	// DefaultSocket.
	Socket string
	// CheckInterval is how often WatchPeer looks at the socket file for a
	// restarted wsl-proxy where inotify cannot watch its directory (--wslProxyCheckInterval, whose default is
	// DefaultCheckInterval); 0 disables the check, and it may not be
	// negative.
	CheckInterval time.Duration
	// UpstreamInterface and UpstreamAddr are where wsl-proxy's
	// connections come into this namespace: the interface
	// (--wslProxyUpstreamInterface) and this namespace's address on it
	// (--wslProxyUpstreamAddr), which wsl-proxy forwards each port to.
	// Both empty (the zero value) means none; the flags default to
	// DefaultUpstreamInterface and DefaultUpstreamAddr.
	UpstreamInterface string
	UpstreamAddr      string
	// Log receives the sink's log lines; nil discards them.
	Log *zap.Logger
}

// Sink sends to wsl-proxy. It holds no connection between calls: each
// Send opens its own and closes it before returning, so there is nothing
// to close.
type Sink struct {
	path     string
	every    time.Duration
	log      *zap.Logger
	back     chan struct{}  // PeerBack
	entrance registry.Entry // Addr invalid: none
}

// New checks cfg and returns a Sink.
func New(cfg Config) (*Sink, error) {
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.CheckInterval < 0 {
		return nil, fmt.Errorf("--wslProxyCheckInterval must not be negative, got %s", cfg.CheckInterval)
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	s := &Sink{path: cfg.Socket, every: cfg.CheckInterval, log: cfg.Log.With(zap.String("sink", Name)), back: make(chan struct{}, 1)}
	switch {
	case cfg.UpstreamInterface == "" && cfg.UpstreamAddr == "":
	case cfg.UpstreamInterface == "" || cfg.UpstreamAddr == "":
		return nil, fmt.Errorf("--wslProxyUpstreamInterface %q and --wslProxyUpstreamAddr %q: give both or neither", cfg.UpstreamInterface, cfg.UpstreamAddr)
	default:
		addr, err := netip.ParseAddr(cfg.UpstreamAddr)
		if err != nil || !addr.Is4() || addr.IsUnspecified() || addr.IsLoopback() {
			return nil, fmt.Errorf("--wslProxyUpstreamAddr %q is not a unicast IPv4 address", cfg.UpstreamAddr)
		}
		s.entrance = registry.Entry{Sink: Name, Interface: cfg.UpstreamInterface, Addr: addr}
	}
	return s, nil
}

func (s *Sink) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", s.path)
}

// Send delivers c as one PortMapping (the router sends one port per
// change) and returns once wsl-proxy has closed the connection, that is,
// applied it.
func (s *Sink) Send(ctx context.Context, c core.Change) error {
	return oneshot.SendApplied(ctx, s.dial, wire.FromChange(c), AppliedWait)
}

// socketID identifies the socket file; a restarted wsl-proxy makes a new one.
type socketID struct {
	dev, ino uint64
	ctime    syscall.Timespec // inode numbers are reused at once; the change time is not
}

func (s *Sink) socket() (socketID, bool) {
	fi, err := os.Stat(s.path)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			s.log.Debug("cannot stat socket", zap.Error(err))
		}
		return socketID{}, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return socketID{}, true
	}
	return socketID{uint64(st.Dev), st.Ino, st.Ctim}, true
}

// WatchPeer reports a lost peer when wsl-proxy's socket is replaced or
// reappears: wsl-proxy keeps no state across restarts. The same news goes
// to PeerBack, so that a router waiting out its backoff after an outage
// sends at once. It looks at the socket when inotify says its directory
// changed, so it costs nothing while nothing changes there; where the
// directory cannot be watched, it looks every CheckInterval.
func (s *Sink) WatchPeer(ctx context.Context, lost func()) {
	if s.every <= 0 {
		return
	}
	var changed <-chan fsnotify.Event
	var failed <-chan error
	var tick <-chan time.Time
	w, err := fsnotify.NewWatcher()
	if err == nil {
		if err = w.Add(filepath.Dir(s.path)); err != nil {
			_ = w.Close()
		}
	}
	if err == nil {
		defer w.Close()
		changed, failed = w.Events, w.Errors
	} else {
		s.log.Info("cannot watch the socket's directory; looking at the socket every interval", zap.Error(err), zap.Duration("interval", s.every))
		t := time.NewTicker(s.every)
		defer t.Stop()
		tick = t.C
	}
	last, present := s.socket()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-changed:
			if filepath.Clean(ev.Name) != filepath.Clean(s.path) {
				continue
			}
		case err := <-failed:
			// Events may have been lost (a full queue): look now, and
			// from now on every interval.
			s.log.Warn("watching the socket's directory failed; looking at the socket every interval", zap.Error(err), zap.Duration("interval", s.every))
			_ = w.Close()
			changed, failed = nil, nil
			t := time.NewTicker(s.every)
			defer t.Stop()
			tick = t.C
		case <-tick:
		}
		id, ok := s.socket()
		switch {
		case ok && (!present || id != last):
			s.log.Info("wsl-proxy socket (re)appeared")
			lost()
			select {
			case s.back <- struct{}{}:
			default:
			}
		case !ok && present:
			s.log.Warn("wsl-proxy socket is gone", zap.String("path", s.path))
		}
		last, present = id, ok
	}
}

// Entrance is wsl-proxy's upstream: where its connections come in.
func (s *Sink) Entrance() (registry.Entry, bool) { return s.entrance, s.entrance.Addr.IsValid() }

// PeerBack delivers a value when WatchPeer sees wsl-proxy's socket
// appear or be replaced.
func (s *Sink) PeerBack() <-chan struct{} { return s.back }

// PeerKeying is ByPort: wsl-proxy keeps one listener per port and closes
// it on any remove of that port, whatever the address.
func (s *Sink) PeerKeying() core.PeerKeying { return core.ByPort }

// Supports reports whether wsl-proxy can listen for p: it handles tcp and
// udp. It never answers, so a port it cannot open would go unnoticed; such
// ports are not sent and show as unsupported.
func (s *Sink) Supports(p core.Port) error {
	if p.Protocol != core.TCP && p.Protocol != core.UDP {
		return fmt.Errorf("%s: wsl-proxy handles tcp and udp only", p)
	}
	return nil
}

// Interface guards.
var (
	_ core.Sink             = (*Sink)(nil)
	_ core.Keyer            = (*Sink)(nil)
	_ core.PeerWatcher      = (*Sink)(nil)
	_ core.PeerBackNotifier = (*Sink)(nil)
	_ core.PortFilter       = (*Sink)(nil)
	_ registry.Entrance     = (*Sink)(nil)
)
