// Package sockets is the source that reports the listening TCP sockets and
// bound UDP sockets, IPv4 and IPv6, of a network namespace: the ports of
// host-network containers and pods and of plain processes, which no engine
// API reports. It reads them through NETLINK_SOCK_DIAG (inet_diag) dumps:
// when an eBPF program on the inet_sock_set_state tracepoint tells it that
// a TCP listener opened or closed (see wake.go), every interval (UDP, and a
// safety net), and again when a socket it holds back is due. Without eBPF
// (Config.Wakeups, or a kernel that refuses it) the interval's dumps alone
// remain.
//
// A socket is reported once dumps have seen it for the settle time
// without a gap, which filters transient sockets such as nerdctl's
// port reservation in its OCI hook; it is removed on the first dump that no
// longer has it. Each mapping is one port, identified by protocol, address
// and port ("tcp/0.0.0.0:8000"); a dual-stack [::] socket is reported as
// 0.0.0.0 (see HostAddr). Excluded are the ports of Config.Exclude, the
// agent's own sockets and those of the processes named in
// Config.ExcludeCommands (docker-proxy, rootlessport, containerd shims),
// whose ports the engine sources report already. A failed dump keeps what
// was reported and is retried on the interval.
//
// With Config.RelayAddr, a reported TCP listener or UDP socket on a
// loopback address (127.0.0.1, ::1) is made reachable from that address
// by a userspace relay in the same namespace, started when the socket is
// reported and stopped when it goes (see relay.go): traffic that arrives
// at the guest's address cannot reach a loopback-only socket otherwise,
// and no NAT rule is added for it. The relay's sockets are the agent's
// own, so they are never reported.
package sockets

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "sockets"

// Defaults of Config.
const (
	DefaultInterval = time.Second
	DefaultSettle   = 200 * time.Millisecond
)

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "listening TCP and bound UDP sockets of the network namespace, read through sock_diag",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			netns := fs.String("socketsNetns", "", "network namespace (path) whose sockets are reported; empty for the agent's own")
			every := fs.Duration("socketsInterval", DefaultInterval, "time between two sock_diag dumps")
			settle := fs.Duration("socketsSettle", DefaultSettle, "how long a socket must be seen before it is reported")
			wakeups := fs.String("socketsWakeups", WakeupsAuto, "eBPF wake-ups when a TCP listener opens or closes: auto (when the kernel allows it, else the periodic dump alone), ebpf (required: fail without it) or off")
			exclude := fs.StringSlice("socketsExclude", DefaultExclude, "ports and ranges never reported, e.g. 22,10248-10259 (the Kubernetes API port is added)")
			relay := fs.String("socketsRelayAddr", DefaultRelayAddr, "address where loopback-only sockets are made reachable by a relay; used in network-tunnel mode, or in any mode when given; empty for none")
			idle := fs.Duration("socketsRelayIdle", DefaultRelayIdle, "how long a relayed TCP connection may carry nothing before it is closed")
			udpIdle := fs.Duration("socketsRelayUDPIdle", DefaultRelayUDPIdle, "how long a relayed UDP client may send and receive nothing before its session ends")
			maxConns := fs.Int("socketsRelayMaxConns", DefaultRelayMaxConns, "TCP connections or UDP sessions one relayed port carries at once")
			return func(env registry.Env) (core.Source, error) {
				ex := *exclude
				if env.Options.K8sAPIPort != 0 {
					ex = append(slices.Clip(ex), strconv.Itoa(int(env.Options.K8sAPIPort)))
				}
				relayAddr := ""
				if env.Options.Mode == core.ModeTunnel || fs.Changed("socketsRelayAddr") {
					relayAddr = *relay
				}
				return New(Config{Netns: *netns, Interval: *every, Settle: *settle, Wakeups: *wakeups, Exclude: ex, Log: env.Log,
					RelayAddr: relayAddr, RelayIdle: *idle, RelayUDPIdle: *udpIdle, RelayMaxConns: *maxConns})
			}
		},
	})
}

// Config configures a Source.
type Config struct {
	// Netns is the path of the network namespace to read; empty for the
	// agent's own.
	Netns string
	// Interval is the time between dumps (default DefaultInterval).
	Interval time.Duration
	// Settle is how long dumps must see a socket before it is reported
	// (default DefaultSettle).
	Settle time.Duration
	// Wakeups says whether an eBPF program wakes a dump when a TCP
	// listener opens or closes: WakeupsAuto (the default when empty),
	// WakeupsEBPF or WakeupsOff.
	Wakeups string
	// Exclude are port numbers and ranges ("22", "10248-10259") never
	// reported. Nil means DefaultExclude; an empty, non-nil slice excludes
	// no port.
	Exclude []string
	// ExcludeCommands are process names (as in /proc/<pid>/comm) whose
	// sockets are not reported. Nil means DefaultExcludeCommands.
	ExcludeCommands []string
	// RelayAddr is an address of the namespace where the reported TCP
	// listeners and UDP sockets on loopback addresses are made reachable:
	// a relay listens on RelayAddr and the socket's port and forwards to
	// the socket. Empty for no relay.
	RelayAddr string
	// RelayIdle ends a relayed TCP connection that carried nothing either
	// way for that long (default DefaultRelayIdle).
	RelayIdle time.Duration
	// RelayUDPIdle ends a relayed UDP client's session that carried no
	// datagram either way for that long (default DefaultRelayUDPIdle).
	RelayUDPIdle time.Duration
	// RelayMaxConns is how many TCP connections, or UDP sessions, one
	// relay carries at once (default DefaultRelayMaxConns).
	RelayMaxConns int
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source reports the sockets of one network namespace.
type Source struct {
	cfg     Config
	log     *zap.Logger
	exclude []PortRange
	self    int
	relay   netip.Addr       // zero: no relay
	onDump  func(woken bool) // tests: called before each dump
}

// New checks cfg and returns a Source.
func New(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	switch {
	case cfg.Interval < 0:
		return nil, fmt.Errorf("--socketsInterval must be positive, got %s", cfg.Interval)
	case cfg.Interval == 0:
		cfg.Interval = DefaultInterval
	}
	switch {
	case cfg.Settle < 0:
		return nil, fmt.Errorf("--socketsSettle must not be negative, got %s", cfg.Settle)
	case cfg.Settle == 0:
		cfg.Settle = DefaultSettle
	}
	switch cfg.Wakeups {
	case "":
		cfg.Wakeups = WakeupsAuto
	case WakeupsAuto, WakeupsEBPF, WakeupsOff:
	default:
		return nil, fmt.Errorf("--socketsWakeups must be %s, %s or %s, got %q", WakeupsAuto, WakeupsEBPF, WakeupsOff, cfg.Wakeups)
	}
	if cfg.Exclude == nil {
		cfg.Exclude = DefaultExclude
	}
	ex, err := ParsePortRanges(cfg.Exclude)
	if err != nil {
		return nil, fmt.Errorf("--socketsExclude: %w", err)
	}
	if cfg.ExcludeCommands == nil {
		cfg.ExcludeCommands = DefaultExcludeCommands
	}
	if cfg.Netns != "" {
		if _, err := os.Stat(cfg.Netns); err != nil {
			return nil, fmt.Errorf("--socketsNetns: %w", err)
		}
	}
	var relay netip.Addr
	if cfg.RelayAddr != "" {
		if relay, err = netip.ParseAddr(cfg.RelayAddr); err != nil || relay.Zone() != "" || relay.IsUnspecified() || relay.IsLoopback() {
			return nil, fmt.Errorf("--socketsRelayAddr %q is not a unicast IP address without a zone", cfg.RelayAddr)
		}
		relay = relay.Unmap()
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{{"--socketsRelayIdle", &cfg.RelayIdle, DefaultRelayIdle}, {"--socketsRelayUDPIdle", &cfg.RelayUDPIdle, DefaultRelayUDPIdle}} {
		switch {
		case *d.v < 0:
			return nil, fmt.Errorf("%s must be positive, got %s", d.name, *d.v)
		case *d.v == 0:
			*d.v = d.def
		}
	}
	switch {
	case cfg.RelayMaxConns < 0:
		return nil, fmt.Errorf("--socketsRelayMaxConns must be positive, got %d", cfg.RelayMaxConns)
	case cfg.RelayMaxConns == 0:
		cfg.RelayMaxConns = DefaultRelayMaxConns
	}
	log := cfg.Log.With(zap.String("source", Name))
	if cfg.Netns != "" {
		log = log.With(zap.String("netns", cfg.Netns))
	}
	return &Source{cfg: cfg, log: log, exclude: ex, self: os.Getpid(), relay: relay}, nil
}

// Timing of the dumps that wake-ups trigger.
const (
	// wakeDelay lets a burst of listen() and close calls end before the
	// dump it triggers.
	wakeDelay = 2 * time.Millisecond
	// wakeDuty bounds the share of time woken dumps take: a woken dump
	// starts no sooner than wakeDuty times the last dump's duration after
	// the last dump started, so at most 1/wakeDuty of a core goes to them
	// however often listeners change (other namespaces' included).
	wakeDuty = 10
)

// Run dumps the sockets until ctx is done. The first report is a snapshot,
// made once the settle time has passed since the first dump, so that every
// socket open when Run started has settled by then (a dump that a wake-up
// brings forward in between does not make it early).
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	wake, how, err := s.startWakeups()
	if err != nil {
		return err
	}
	var woken, stopped <-chan struct{}
	if wake != nil {
		defer wake.close()
		woken, stopped = wake.C, wake.Stopped
	}
	describe(out, how)
	d := &dumper{netns: s.cfg.Netns}
	defer d.close()
	relays := newRelays(s.cfg, s.relay, s.log)
	defer relays.close()
	g := newGate(s.cfg.Settle)
	var firstDump time.Time // the first dump that succeeded: what it saw settles first
	synced, failing, badLogged := false, false, false
	timer := time.NewTimer(0)
	defer timer.Stop()
	due := time.Now() // when the timer fires
	var lastStart time.Time
	var lastCost time.Duration
	byWake := false // the timer was moved forward by a wake-up
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-woken:
			at := time.Now().Add(wakeDelay)
			if capped := lastStart.Add(wakeDuty * lastCost); capped.After(at) {
				at = capped
			}
			if at.Before(due) {
				timer.Reset(time.Until(at))
				due, byWake = at, true
			}
			continue
		case <-stopped:
			s.log.Warn("eBPF wake-ups stopped; reading sockets by the periodic dump alone", zap.Error(wake.Err))
			woken, stopped = nil, nil
			describe(out, fmt.Sprintf("sock_diag dump every %s (eBPF wake-ups stopped: %v)", s.cfg.Interval, wake.Err))
			continue
		}
		if s.onDump != nil {
			s.onDump(byWake)
		}
		byWake = false
		wait := s.cfg.Interval
		lastStart = time.Now()
		socks, bad, err := d.dump()
		lastCost = time.Since(lastStart)
		if err != nil {
			if !failing {
				s.log.Warn("cannot read sockets; keeping what was reported, will retry", zap.Error(err))
			}
			failing = true
			due = time.Now().Add(wait)
			timer.Reset(wait)
			continue
		}
		if failing {
			s.log.Info("reading sockets again")
			failing = false
		}
		if bad > 0 && !badLogged {
			s.log.Warn("sock_diag messages that do not decode were skipped", zap.Int("messages", bad))
			badLogged = true
		}
		now := time.Now()
		if firstDump.IsZero() {
			firstDump = now
		}
		ready, gone, transient, next := g.observe(now, s.candidates(socks))
		for _, id := range transient {
			s.log.Debug("socket gone before it settled; not reported", zap.String("id", id))
		}
		s.judge(g, ready)
		for _, id := range gone {
			relays.remove(id)
		}
		for _, id := range ready {
			if e := g.entries[id]; e.reported {
				relays.add(id, e.port)
			}
		}
		switch {
		case synced:
			for _, id := range gone {
				out.Delete(id)
			}
			for _, id := range ready {
				if e := g.entries[id]; e.reported {
					out.Set(g.mapping(id))
				}
			}
		case now.Sub(firstDump) >= s.cfg.Settle:
			ms := g.reported()
			out.Snapshot(ms)
			synced = true
			s.log.Info("sockets listed", zap.Int("mappings", len(ms)))
		default:
			wait = min(wait, firstDump.Add(s.cfg.Settle).Sub(now))
		}
		if next > 0 {
			wait = min(wait, next)
		}
		due = now.Add(wait)
		timer.Reset(wait)
	}
}

// startWakeups loads the eBPF wake-ups as Config.Wakeups asks, logs which
// way the sockets are read, and returns the wake-ups (nil for none) and
// that way in words.
func (s *Source) startWakeups() (*wakeups, string, error) {
	poll := fmt.Sprintf("sock_diag dump every %s", s.cfg.Interval)
	if s.cfg.Wakeups == WakeupsOff {
		s.log.Info("reading sockets by a periodic sock_diag dump; eBPF wake-ups are off",
			zap.Duration("interval", s.cfg.Interval), zap.Duration("settle", s.cfg.Settle))
		return nil, poll + " (eBPF wake-ups off)", nil
	}
	w, err := loadWakeups()
	if err != nil {
		if s.cfg.Wakeups == WakeupsEBPF {
			return nil, "", fmt.Errorf("eBPF wake-ups (--socketsWakeups=%s): %w", WakeupsEBPF, err)
		}
		s.log.Warn("eBPF wake-ups unavailable; reading sockets by a periodic sock_diag dump alone",
			zap.Error(err), zap.Duration("interval", s.cfg.Interval), zap.Duration("settle", s.cfg.Settle))
		return nil, fmt.Sprintf("%s (eBPF wake-ups unavailable: %v)", poll, err), nil
	}
	s.log.Info("reading sockets by sock_diag dumps that eBPF wake-ups trigger when a TCP listener opens or closes, and every interval (UDP sockets, and as a safety net)",
		zap.Duration("interval", s.cfg.Interval), zap.Duration("settle", s.cfg.Settle))
	return w, fmt.Sprintf("sock_diag dump on eBPF wake-ups (TCP listeners, %s tracepoint) and every %s", tracepoint, s.cfg.Interval), nil
}

// describe tells the router how the source watches, when it can listen.
func describe(out core.Emitter, how string) {
	if d, ok := out.(core.Describer); ok {
		d.Describe(how)
	}
}

// candidates groups the reportable sockets by identity, leaving out the
// excluded ports.
func (s *Source) candidates(socks []Socket) map[string]candidate {
	out := make(map[string]candidate, len(socks))
	for _, sk := range socks {
		p, ok := Identity(sk)
		if !ok || excluded(s.exclude, p.HostPort) {
			continue
		}
		id := ID(p)
		c := out[id]
		c.port = p
		if !slices.Contains(c.inodes, sk.Inode) {
			c.inodes = append(c.inodes, sk.Inode)
		}
		out[id] = c
	}
	for id, c := range out {
		slices.Sort(c.inodes)
		out[id] = c
	}
	return out
}

// judge decides, for each id that has settled, whether it is reported: not
// when every socket behind it is held by the agent itself or by a process
// of ExcludeCommands. Only settled sockets are looked up in /proc, in one
// scan, so short-lived sockets cost nothing. A socket no visible process
// holds (another PID namespace sharing the network, a kernel socket) is
// reported.
func (s *Source) judge(g *gate, ready []string) {
	if len(ready) == 0 {
		return
	}
	want := map[uint32]bool{}
	for _, id := range ready {
		for _, ino := range g.inodes(id) {
			want[ino] = true
		}
	}
	holders := findHolders("/proc", want)
	for _, id := range ready {
		if why, ok := s.excludedOwner(g.inodes(id), holders); ok {
			g.exclude(id)
			s.log.Debug("socket left out", zap.String("id", id), zap.String("held_by", why))
			continue
		}
		g.report(id)
	}
}

// excludedOwner reports whether every one of inodes is held by the agent
// or an excluded command, and names one such holder.
func (s *Source) excludedOwner(inodes []uint32, holders map[uint32][]holder) (string, bool) {
	why := ""
	for _, ino := range inodes {
		h, ok := s.excludedHolder(holders[ino])
		if !ok {
			return "", false
		}
		why = h
	}
	return why, why != ""
}

func (s *Source) excludedHolder(hs []holder) (string, bool) {
	for _, h := range hs {
		if h.pid == s.self {
			return "the agent", true
		}
		if slices.Contains(s.cfg.ExcludeCommands, h.comm) {
			return fmt.Sprintf("%s (pid %d)", h.comm, h.pid), true
		}
	}
	return "", false
}

// Interface guards.
var _ core.Source = (*Source)(nil)
