// Package iptables is the source that scans the kernel's NAT rules for the
// service ports kube-proxy exposes — in iptables mode (the KUBE-NODEPORTS
// and KUBE-SERVICES chains of the nat table) and in nftables mode (the
// kube-proxy table's service-nodeports and service-ips maps) — and the
// hostPorts of the CNI portmap plugin (CNI-HOSTPORT-DNAT and the CNI-DN-*
// chains it jumps to), leaving out the loopback NAT rules the container
// sources add to CNI's chains.
//
// Everything in nftables is read over netlink, in the agent's network
// namespace or the one --iptablesNetns names: kube-proxy's maps, and the
// rules of iptables-nft and ip6tables-nft, whose match and target
// expressions are decoded into what `iptables -S` prints of them, so that
// both are parsed alike. The legacy back-end (x_tables) is read with
// iptables-legacy-save and ip6tables-legacy-save run inside that namespace,
// and only where the namespace has a legacy nat table; --iptablesCommands
// names commands to run instead.
//
// iptables-nft's chains are dumped once and then kept up to date from the
// nftables change notifications, which carry every added and deleted rule
// whole: the kernel's dump of a chain costs in proportion to the square of
// its length (seconds for 50,000 services), while a change costs what it
// holds. The chains are dumped again when notifications were lost, and as
// a check every 10 scan intervals or 20 times what the last dump took.
//
// Changes to the chains and maps the source reads trigger a scan:
// notifications of one transaction count once, and a burst is read by one
// scan 20 ms after its first notification. Scanning earns credit at a
// tenth of the time passing (at most 100 ms of it) and each notified scan
// spends its duration; a notified scan waits while the credit is
// overdrawn (ten times the overdraft), so that notified scans take at most
// about a tenth of a core however fast the rules change. Notifications for other
// tables and chains (Docker's filter rules, say) are ignored. A periodic
// scan runs every scan interval, or every 20 times a scan's duration when
// that is longer: it reads the legacy back-end (which sends no
// notifications), and kube-proxy's maps only every 10 intervals (or 20
// times what reading them takes) while notifications work, and every time
// when they do not (iptables-nft's chains are then dumped every time too).
// Rules are parsed only when they changed, and listeners are opened on the
// ports found, as kubelet no longer does.
package iptables

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "iptables"

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "service ports in kube-proxy's and CNI's NAT rules (iptables and nftables), with listeners",
		Noun:    "NAT rule",
		Enable: &registry.Enable{Flag: "iptables", ImpliedBy: "kubernetes",
			Usage: "with --kubernetes: scan kube-proxy's NAT rules for service ports and open their listeners"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			cmds := fs.StringSlice("iptablesCommands", nil, "iptables commands run per scan as CMD -t nat -S CHAIN in --iptablesNetns, in place of the legacy back-end's iptables-legacy-save and ip6tables-legacy-save (run by default where the namespace has a legacy nat table); iptables-nft rules are read over netlink either way")
			every := fs.Duration("iptablesScanInterval", defaultInterval, "time between two periodic scans, or 20 times what a scan takes if longer; while nftables change notifications work they read kube-proxy's maps and dump iptables-nft's chains only every 10 intervals (or 20 times what that takes), as each change to the chains and maps read triggers a scan 20 ms later (paced to at most about a tenth of a core) and iptables-nft's rule changes are taken from the notifications")
			listen := fs.Bool("iptablesListeners", true, "open a listener on each service port found, as kubelet no longer does")
			netns := fs.String("iptablesNetns", "", "network namespace (path) whose rules are scanned, on every back-end; empty for the agent's own")
			return func(env registry.Env) (core.Source, error) {
				return New(Config{
					Commands:    *cmds,
					Interval:    *every,
					NoListeners: !*listen,
					Netns:       *netns,
					ListenAddr:  env.Options.K8sServiceListenerAddr,
					Log:         env.Log,
				})
			}
		},
	})
}

// defaultInterval is the time between periodic scans when Config.Interval
// is zero.
const defaultInterval = 3 * time.Second

// Config configures a Source. Its zero value scans the agent's own
// network namespace every 3 s, reads the legacy back-end with its save
// commands, and opens listeners on 127.0.0.1.
type Config struct {
	// Commands (--iptablesCommands) are iptables commands run per scan, as
	// `CMD -t nat -S CHAIN` inside Netns, in place of iptables-legacy-save
	// and ip6tables-legacy-save. Empty, the default, reads the legacy
	// back-end with those where the namespace has a legacy nat table. The
	// rules of iptables-nft are read over netlink either way. New fails
	// when a command cannot be run.
	Commands []string
	// Interval (--iptablesScanInterval) is the time between periodic
	// scans; it stretches to 20 times a scan's duration when that is
	// longer. Zero means 3 s; a negative interval is an error.
	Interval time.Duration
	// NoListeners (--iptablesListeners=false) leaves the ports found
	// without listeners. By default the source opens a listener on each
	// TCP and UDP port it reports.
	NoListeners bool
	// Netns (--iptablesNetns) is the path of the network namespace whose
	// rules are read (over netlink, and by the legacy commands, which run
	// there). Empty, the default, is the agent's own. New fails when the
	// path does not exist.
	Netns string
	// ListenAddr is where service ports are bound on the host (the
	// --k8sServiceListenerAddr, taken from registry.Env's options) and
	// where listeners open, for the ports whose rules bind no address.
	// The zero Addr means 127.0.0.1.
	ListenAddr netip.Addr
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source scans NAT rules.
type Source struct {
	cfg    Config
	log    *zap.Logger
	cmds   []command     // --iptablesCommands
	legacy []legacySaver // the legacy back-end's save commands, without cmds
	scans  atomic.Int64  // scans made, for tests and benchmarks
	busy   atomic.Int64  // nanoseconds spent scanning, likewise
	// watching is set while nftables change notifications are read.
	watching atomic.Bool
	// changes carries what the notifications say changed in iptables-nft's
	// chains, from the watcher to the scans.
	changes ruleLog
}

// New fills in cfg's defaults, checks it and returns a Source. It fails
// when cfg.Interval is negative, cfg.Netns does not exist or a command of
// cfg.Commands cannot be run.
func New(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("--iptablesScanInterval must be positive, got %s", cfg.Interval)
	}
	if cfg.Interval == 0 {
		cfg.Interval = defaultInterval
	}
	if !cfg.ListenAddr.IsValid() {
		cfg.ListenAddr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if cfg.Netns != "" {
		if _, err := os.Stat(cfg.Netns); err != nil {
			return nil, fmt.Errorf("--iptablesNetns: %w", err)
		}
	}
	s := &Source{cfg: cfg, log: cfg.Log.With(zap.String("source", Name))}
	for _, c := range cfg.Commands {
		ipt, err := goipt.New(goipt.Path(c), goipt.Timeout(5))
		if err != nil {
			return nil, fmt.Errorf("--iptablesCommands %s: %w", c, err)
		}
		s.cmds = append(s.cmds, command{c, ipt})
	}
	if len(s.cmds) == 0 {
		s.legacy = legacySavers()
	}
	return s, nil
}

// Run scans until ctx is done: once at the start, on the interval, and
// after the changes the nftables notifications announce.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	ls := newListeners(s.cfg.ListenAddr, s.log)
	defer ls.closeAll()
	changed := make(chan struct{}, 1)
	ready := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { s.watch(ctx, changed, ready) })
	defer wg.Wait()
	select { // notifications first, so that no change is missed after the first scan
	case <-ready:
	case <-ctx.Done():
		return nil
	}
	s.scanLoop(ctx, out, ls, changed)
	return nil
}

// Interface guards.
var (
	_ core.Source = (*Source)(nil)
)
