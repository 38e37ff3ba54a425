// Package loopbacknat manages the NAT rules that let traffic forwarded from
// the host reach container ports published on 127.0.0.1. For each such
// binding (protocol, host port P, backend C:c) it keeps three rules in the
// nat table, tagged with a comment so that leftovers can be found:
//
//	PREROUTING  -d GUEST/32 -p tcp -m tcp --dport P -j DNAT --to-destination 127.0.0.1:P
//	POSTROUTING -s 127.0.0.1/32 -o IFACE -p tcp -m tcp --sport P -j MASQUERADE
//	<chain>     -p tcp -m tcp --dport P -j DNAT --to-destination C:c   (appended after the engine's own rule)
//
// The engine's own rule only matches traffic to 127.0.0.1; the appended one
// matches any destination, so traffic arriving on the guest's address lands.
package loopbacknat

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/coreos/go-iptables/iptables"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// Comment tags every rule this package writes.
const Comment = "guestagent-loopback"

// Binding is one port published on 127.0.0.1.
type Binding struct {
	Protocol core.Protocol
	HostPort uint16
	Backend  netip.AddrPort // the container's address and port
	// Chain, when set, is where the engine wrote this binding's DNAT rule
	// (CNI's per-container CNI-DN-* chain); otherwise Config.Chain.
	Chain string
}

// Config configures a Manager.
type Config struct {
	// Iptables is the iptables command (name on PATH or path).
	Iptables string
	// Chain is where the engine writes its DNAT rules (DOCKER for dockerd;
	// empty when every binding names its own chain).
	Chain string
	// Interface is the guest's interface toward the host (eth0).
	Interface string
	// GuestIP is the guest's address toward the host (192.168.127.2).
	GuestIP netip.Addr
	// Log receives the manager's log lines; nil discards them.
	Log *zap.Logger
}

// Flags defines the loopback NAT flags of one source, named with prefix
// (e.g. "docker" gives --dockerLoopbackNAT), and returns a function that
// reads them: it returns nil when the rules are turned off.
func Flags(fs *pflag.FlagSet, prefix, chain string) func(*zap.Logger) (*Manager, error) {
	on := fs.Bool(prefix+"LoopbackNAT", true, "add NAT rules so forwarded traffic reaches ports published on 127.0.0.1")
	cmd := fs.String(prefix+"Iptables", "iptables", "iptables command for the loopback NAT rules")
	iface := fs.String(prefix+"NATInterface", "eth0", "interface toward the host, for the loopback NAT rules")
	guest := fs.String(prefix+"NATGuestIP", "192.168.127.2", "this guest's address toward the host, for the loopback NAT rules")
	return func(log *zap.Logger) (*Manager, error) {
		if !*on {
			return nil, nil
		}
		ip, err := netip.ParseAddr(*guest)
		if err != nil || !ip.Is4() {
			return nil, fmt.Errorf("--%sNATGuestIP %q is not an IPv4 address", prefix, *guest)
		}
		if *iface == "" {
			return nil, fmt.Errorf("--%sNATInterface is empty", prefix)
		}
		m, err := New(Config{Iptables: *cmd, Chain: chain, Interface: *iface, GuestIP: ip, Log: log})
		if err != nil {
			return nil, fmt.Errorf("%w (turn the rules off with --%sLoopbackNAT=false)", err, prefix)
		}
		return m, nil
	}
}

// Manager keeps the rules of every owner (a container id).
type Manager struct {
	cfg Config
	ipt *iptables.IPTables
	log *zap.Logger

	mu     sync.Mutex
	owners map[string][]Binding
}

// New checks that iptables runs and returns a Manager.
func New(cfg Config) (*Manager, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Iptables == "" {
		cfg.Iptables = "iptables"
	}
	ipt, err := iptables.New(iptables.Timeout(5), iptables.Path(cfg.Iptables))
	if err != nil {
		return nil, fmt.Errorf("loopback NAT rules need iptables: %w", err)
	}
	return &Manager{cfg: cfg, ipt: ipt, log: cfg.Log, owners: map[string][]Binding{}}, nil
}

// rule is one iptables rule: its chain and spec.
type rule struct {
	chain string
	spec  []string
}

// String renders r as `iptables -t nat -S` prints it.
func (r rule) String() string { return "-A " + r.chain + " " + strings.Join(r.spec, " ") }

func (m *Manager) rules(b Binding) []rule {
	chain := cmp.Or(b.Chain, m.cfg.Chain)
	proto := string(b.Protocol)
	port := strconv.Itoa(int(b.HostPort))
	tag := []string{"-m", "comment", "--comment", Comment}
	match := func(dir string) []string { return []string{"-p", proto, "-m", proto, dir, port} }
	join := func(parts ...[]string) []string { return slices.Concat(parts...) }
	return []rule{
		{"PREROUTING", join([]string{"-d", m.cfg.GuestIP.String() + "/32"}, match("--dport"), tag,
			[]string{"-j", "DNAT", "--to-destination", "127.0.0.1:" + port})},
		{"POSTROUTING", join([]string{"-s", "127.0.0.1/32", "-o", m.cfg.Interface}, match("--sport"), tag,
			[]string{"-j", "MASQUERADE"})},
		{chain, join(match("--dport"), tag,
			[]string{"-j", "DNAT", "--to-destination", b.Backend.String()})},
	}
}

// Valid reports whether b can have rules: tcp, udp or sctp to an IPv4
// backend.
func Valid(b Binding) bool {
	return b.HostPort != 0 && b.Backend.Addr().Is4() && b.Backend.Port() != 0 &&
		(b.Protocol == core.TCP || b.Protocol == core.UDP || b.Protocol == core.SCTP)
}

// Set makes owner's rules exactly those of bs, adding what is missing and
// deleting what went.
func (m *Manager) Set(owner string, bs []Binding) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.set(owner, bs)
}

func (m *Manager) set(owner string, bs []Binding) error {
	bs = slices.DeleteFunc(slices.Clone(bs), func(b Binding) bool { return !Valid(b) })
	old := m.owners[owner]
	var errs []error
	for _, b := range old {
		if !slices.Contains(bs, b) {
			errs = append(errs, m.apply(b, false)...)
		}
	}
	for _, b := range bs {
		errs = append(errs, m.apply(b, true)...)
	}
	if len(bs) == 0 {
		delete(m.owners, owner)
	} else {
		m.owners[owner] = bs
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("loopback NAT rules for %s: %w", owner, err)
	}
	return nil
}

func (m *Manager) apply(b Binding, add bool) []error {
	var errs []error
	for _, r := range m.rules(b) {
		var err error
		if add {
			err = m.ipt.AppendUnique("nat", r.chain, r.spec...)
		} else {
			err = m.ipt.DeleteIfExists("nat", r.chain, r.spec...)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r, err))
		} else {
			m.log.Debug("loopback NAT rule", zap.Bool("add", add), zap.Stringer("rule", r))
		}
	}
	return errs
}

// Remove deletes owner's rules.
func (m *Manager) Remove(owner string) error { return m.Set(owner, nil) }

// Sync makes the rules match all, owner by owner, and deletes every rule
// with this package's comment that no owner wants (left by an earlier run).
func (m *Manager) Sync(all map[string][]Binding) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	want := map[string]bool{}
	for _, bs := range all {
		for _, b := range bs {
			if Valid(b) {
				for _, r := range m.rules(b) {
					want[r.String()] = true
				}
			}
		}
	}
	var errs []error
	// Per-container chains go with their containers; the shared ones are
	// searched for leftovers.
	for _, chain := range slices.DeleteFunc([]string{"PREROUTING", "POSTROUTING", m.cfg.Chain}, func(c string) bool { return c == "" }) {
		listed, err := m.ipt.List("nat", chain)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing nat %s: %w", chain, err))
			continue
		}
		for _, line := range listed {
			if !strings.Contains(line, Comment) || want[line] {
				continue
			}
			fields := strings.Fields(line)
			if len(fields) < 3 || fields[0] != "-A" {
				continue
			}
			m.log.Info("removing leftover loopback NAT rule", zap.String("rule", line))
			if err := m.ipt.DeleteIfExists("nat", fields[1], fields[2:]...); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for owner := range m.owners {
		if _, ok := all[owner]; !ok {
			delete(m.owners, owner)
		}
	}
	for owner, bs := range all {
		m.owners[owner] = nil // rules were just reconciled; re-add all
		if err := m.set(owner, bs); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
