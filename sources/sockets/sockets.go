// Package sockets is the source that reports the listening TCP sockets and
// bound UDP sockets, IPv4 and IPv6, of a network namespace: the ports of
// host-network containers and pods and of plain processes, which no engine
// API reports. It reads them through NETLINK_SOCK_DIAG (inet_diag) dumps:
// when an eBPF program on the inet_sock_set_state tracepoint tells it that
// a TCP listener opened or closed (see wake.go), when cgroup socket
// programs tell it that a UDP socket was bound to a port its process
// named, or released (see udpwake.go; a UDP socket whose port the kernel
// picked, a client's, is then never reported), every Recheck as a safety net (every Interval when the UDP
// programs cannot run), and again when a socket it holds back is due.
// Without eBPF (Config.Wakeups, or a kernel that refuses it) the
// Interval's dumps alone remain.
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
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
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
	DefaultRecheck  = 30 * time.Second
	DefaultSettle   = 200 * time.Millisecond
)

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "listening TCP and bound UDP sockets of the network namespace, read through sock_diag",
		Noun:    "listening socket",
		Enable: &registry.Enable{Flag: "sockets", Modes: []core.Mode{core.ModeTunnel},
			Usage: "expose the listening sockets of the agent's network namespace (host-network containers and pods, plain processes); default: on in network-tunnel mode (--adminInstall), off otherwise"},
		GuestAddrFlags: []string{"socketsRelayAddr"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			var cfg Config
			fs.StringVar(&cfg.Netns, "socketsNetns", "", "network namespace (path) whose sockets are reported; empty for the agent's own")
			fs.DurationVar(&cfg.Interval, "socketsInterval", DefaultInterval, "time between two sock_diag dumps, unless eBPF wake-ups cover TCP and UDP")
			fs.DurationVar(&cfg.Recheck, "socketsRecheckInterval", DefaultRecheck, "time between two sock_diag dumps no wake-up asked for, when eBPF wake-ups cover TCP and UDP (a safety net)")
			fs.DurationVar(&cfg.Settle, "socketsSettle", DefaultSettle, "how long a socket must be seen before it is reported")
			fs.StringVar(&cfg.Wakeups, "socketsWakeups", WakeupsAuto, "eBPF wake-ups when a TCP listener opens or closes: auto (when the kernel allows it, else the periodic dump alone), ebpf (required: fail without it) or off")
			fs.StringSliceVar(&cfg.Exclude, "socketsExclude", DefaultExclude, "ports and ranges never reported, e.g. 22,10248-10259 (the Kubernetes API port is added)")
			fs.StringVar(&cfg.RelayAddr, "socketsRelayAddr", DefaultRelayAddr, "address where loopback-only sockets are made reachable by a relay; used in network-tunnel mode, or in any mode when given; empty for none")
			fs.StringVar(&cfg.RelayInterface, "socketsRelayInterface", DefaultRelayInterface, "interface the relay's sockets on --socketsRelayAddr are bound to, so that only traffic coming in through it reaches them (the tunnel's); empty for any. When the interface is made again (a restarted gvproxy's tap), the relays are opened again on it")
			fs.DurationVar(&cfg.RelayIdle, "socketsRelayIdle", DefaultRelayIdle, "how long a relayed TCP connection may carry nothing before it is closed")
			fs.DurationVar(&cfg.RelayUDPIdle, "socketsRelayUDPIdle", DefaultRelayUDPIdle, "how long a relayed UDP client may send and receive nothing before its session ends")
			fs.IntVar(&cfg.RelayMaxConns, "socketsRelayMaxConns", DefaultRelayMaxConns, "TCP connections or UDP sessions one relayed port carries at once")
			fs.IntVar(&cfg.RelayMaxPerClient, "socketsRelayMaxPerClient", DefaultRelayMaxPerClient, "TCP connections or UDP sessions one client address may hold on one relayed port")
			fs.IntVar(&cfg.RelayMaxTotal, "socketsRelayMaxTotal", DefaultRelayMaxTotal, "TCP connections and UDP sessions every relayed port together carries at once (each holds two descriptors)")
			return func(env registry.Env) (core.Source, error) {
				c := cfg
				c.KubernetesAPIPort = env.Options.K8sAPIPort
				c.Mode = env.Options.Mode
				c.RelayInTunnelModeOnly = !fs.Changed("socketsRelayAddr")
				c.Entries = env.Options.Entries
				c.Log = env.Log
				s, err := New(c)
				if err == nil && env.Metrics != nil {
					env.Metrics(RelayCollector(s))
				}
				return s, err
			}
		},
	})
}

// Config configures a Source.
type Config struct {
	// Netns is the path of the network namespace to read; empty for the
	// agent's own.
	Netns string
	// Interval is the time between dumps (default DefaultInterval) when
	// eBPF wake-ups do not cover both TCP and UDP.
	Interval time.Duration
	// Recheck is the time between dumps that no wake-up asked for when
	// eBPF wake-ups cover both TCP and UDP (default DefaultRecheck).
	Recheck time.Duration
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
	// KubernetesAPIPort is the Kubernetes API server's port (from
	// --k8sAPIPort), never reported either: it is added to Exclude. Zero
	// adds none.
	KubernetesAPIPort uint16
	// ExcludeCommands are process names (as in /proc/<pid>/comm) whose
	// sockets are not reported. Nil means DefaultExcludeCommands.
	ExcludeCommands []string
	// RelayAddr is an address of the namespace where the reported TCP
	// listeners and UDP sockets on loopback addresses are made reachable:
	// a relay listens on RelayAddr and the socket's port and forwards to
	// the socket. Empty for no relay.
	RelayAddr string
	// RelayInterface, when set, is the interface the relay's sockets on
	// RelayAddr are bound to (SO_BINDTODEVICE): only connections and
	// datagrams that come in through it reach them, not those of the
	// containers on the guest's bridges. Empty binds none; the flag's
	// default is DefaultRelayInterface.
	// An interface deleted and made again (the tap of a restarted gvproxy)
	// is a new device: the source, watching the namespace's links, opens
	// the relays again on it.
	RelayInterface string
	// Entries are the selected sinks' other ways into the guest
	// (registry.Options.Entries): while the relay is on, loopback-only
	// sockets are relayed on each entry's address too, bound to its
	// interface.
	Entries []registry.Entry
	// RelayInTunnelModeOnly turns the relay off unless Mode is
	// core.ModeTunnel. The registration sets it when --socketsRelayAddr is
	// left at its default, the guest's address on host-switch's network,
	// which only network-tunnel mode uses; an address given on the command
	// line is relayed in any mode. False (the default) relays at RelayAddr
	// whatever the mode.
	RelayInTunnelModeOnly bool
	// Mode is the agent's networking mode, which RelayInTunnelModeOnly
	// reads (default core.ModeLocal).
	Mode core.Mode
	// RelayIdle ends a relayed TCP connection that carried nothing either
	// way for that long (default DefaultRelayIdle).
	RelayIdle time.Duration
	// RelayUDPIdle ends a relayed UDP client's session that carried no
	// datagram either way for that long (default DefaultRelayUDPIdle).
	RelayUDPIdle time.Duration
	// RelayMaxConns is how many TCP connections, or UDP sessions, one
	// relay carries at once (default DefaultRelayMaxConns).
	RelayMaxConns int
	// RelayMaxPerClient is how many of them one client address may hold
	// on one relay (default DefaultRelayMaxPerClient): a client that
	// opens many never locks others out.
	RelayMaxPerClient int
	// RelayMaxTotal is how many every relay together carries at once
	// (default DefaultRelayMaxTotal), which bounds the descriptors the
	// relays hold (two each).
	RelayMaxTotal int
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source reports the sockets of one network namespace.
type Source struct {
	cfg     Config
	log     *zap.Logger
	exclude []PortRange
	self    int
	relayAt []relayEntry           // none: no relay
	onDump  func(woken bool)       // tests: called before each dump
	live    atomic.Pointer[relays] // the running Run's relays, for RelayCollector
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
	case cfg.Recheck < 0:
		return nil, fmt.Errorf("--socketsRecheckInterval must be positive, got %s", cfg.Recheck)
	case cfg.Recheck == 0:
		cfg.Recheck = DefaultRecheck
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
	if cfg.KubernetesAPIPort != 0 {
		cfg.Exclude = append(slices.Clip(cfg.Exclude), strconv.Itoa(int(cfg.KubernetesAPIPort)))
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
	if cfg.RelayInTunnelModeOnly && cfg.Mode != core.ModeTunnel {
		cfg.RelayAddr = ""
	}
	var relay netip.Addr
	if cfg.RelayAddr != "" {
		if relay, err = netip.ParseAddr(cfg.RelayAddr); err != nil || relay.Zone() != "" || relay.IsUnspecified() || relay.IsLoopback() {
			return nil, fmt.Errorf("--socketsRelayAddr %q is not a unicast IP address without a zone", cfg.RelayAddr)
		}
		relay = relay.Unmap()
	}
	var relayAt []relayEntry
	if relay.IsValid() {
		relayAt = append(relayAt, relayEntry{relay, cfg.RelayInterface})
		for _, e := range cfg.Entries {
			if e.Addr.IsValid() && !slices.ContainsFunc(relayAt, func(r relayEntry) bool { return r.addr == e.Addr.Unmap() }) {
				relayAt = append(relayAt, relayEntry{e.Addr.Unmap(), e.Interface})
			}
		}
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
	switch {
	case cfg.RelayMaxPerClient < 0:
		return nil, fmt.Errorf("--socketsRelayMaxPerClient must be positive, got %d", cfg.RelayMaxPerClient)
	case cfg.RelayMaxPerClient == 0:
		cfg.RelayMaxPerClient = DefaultRelayMaxPerClient
	}
	switch {
	case cfg.RelayMaxTotal < 0:
		return nil, fmt.Errorf("--socketsRelayMaxTotal must be positive, got %d", cfg.RelayMaxTotal)
	case cfg.RelayMaxTotal == 0:
		cfg.RelayMaxTotal = DefaultRelayMaxTotal
	}
	log := cfg.Log.With(zap.String("source", Name))
	if cfg.Netns != "" {
		log = log.With(zap.String("netns", cfg.Netns))
	}
	return &Source{cfg: cfg, log: log, exclude: ex, self: os.Getpid(), relayAt: relayAt}, nil
}

// Interface guards.
var _ core.Source = (*Source)(nil)
