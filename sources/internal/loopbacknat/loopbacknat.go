// Package loopbacknat manages the NAT rules that let traffic forwarded from
// the host reach container ports published on 127.0.0.1. The host side
// reaches the guest through one interface (IFACE, the tunnel: eth0) at one
// address (GUEST), and other peers may come in through entries of their own
// (wsl-proxy through its upstream: veth-rd-ns, 192.168.143.1); for each
// binding (protocol, host port P, backend C:c) and each of these entries
// the manager keeps one rule in the nat table, which matches only traffic
// of that path:
//
//	<chain> -d GUEST/32 -i IFACE -p tcp -m tcp --dport P -m comment --comment "guestagent-loopback:OWNER" -j DNAT --to-destination C:c
//
// It is appended to the engine's chain (DOCKER, or CNI's per-container
// CNI-DN-* chain), after the engine's own rule, which matches only traffic
// to 127.0.0.1. The engine's PREROUTING jump to that chain (for local
// destinations) brings the traffic to it, so the rule works wherever the
// engine's own rules do, and the order of PREROUTING does not matter. A
// port published on 127.0.0.1 thus answers on the guest's address for
// connections that come in through the tunnel, and stays refused, as
// without the rule, for connections from the bridge networks, from the
// guest's other interfaces, to the guest's other addresses (a bridge
// gateway), and from the guest itself (locally made packets have no input
// interface).
//
// Earlier versions also wrote a PREROUTING DNAT of GUEST:P to 127.0.0.1:P
// and a POSTROUTING masquerade of 127.0.0.1:P on IFACE. Without
// net.ipv4.conf.IFACE.route_localnet=1 (which neither the engines nor the
// agent set) the kernel drops a packet from IFACE sent to 127.0.0.1, so
// that pair carried nothing while the engine's jump came first, and cut
// the port off once a restarted dockerd appended its jump again behind it
// (measured: TestLoopbackPortSurvivesADockerdRestart in sources/docker
// timed out through the tunnel with the pair, and answers without it).
// Sync deletes such rules of its owner.
//
// OWNER names the source the manager works for (docker, containerd), so
// that the managers of two sources on one guest never delete each other's
// rules. Rules tagged "guestagent-loopback" alone, without an owner, were
// written by earlier versions of the agent, which matched traffic from any
// interface to any address; every manager deletes them when it syncs (see
// Manager.Sync).
package loopbacknat

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// CommentPrefix starts the comment of every rule this package writes. The
// full comment is CommentPrefix + ":" + the manager's owner; earlier
// versions wrote CommentPrefix alone.
const CommentPrefix = "guestagent-loopback"

// OwnerComment returns the comment of the rules owner's manager writes.
func OwnerComment(owner string) string { return CommentPrefix + ":" + owner }

// IsOwnRule reports whether comment, the unquoted argument of a rule's
// --comment, marks a rule written by a loopback NAT manager, of any owner
// or of none. Readers of the NAT rules use it to tell these rules from the
// engines' own.
func IsOwnRule(comment string) bool {
	rest, ok := strings.CutPrefix(comment, CommentPrefix)
	return ok && (rest == "" || rest[0] == ':')
}

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
	// Owner names the source whose rules these are (docker, containerd):
	// letters, digits, '-' and '_'. It goes into every rule's comment, and
	// a manager deletes only rules of its own owner. Required.
	Owner string
	// Iptables is the iptables command (name on PATH or path); empty for
	// "iptables". The changes of one batch go to its iptables-restore
	// (the same name with "-restore" after it) in one run when there is
	// one, else one run of Iptables per rule.
	Iptables string
	// Chain is where the engine writes its DNAT rules (DOCKER for dockerd;
	// empty when every binding names its own chain).
	Chain string
	// Interface is the guest's interface toward the host (eth0): the rules
	// match only traffic that comes in, or goes out, through it. Required.
	Interface string
	// GuestIP is the guest's IPv4 address toward the host (192.168.127.2):
	// the DNAT rules match only traffic to it. Required.
	GuestIP netip.Addr
	// Entries are further ways in: each binding gets a rule for each of
	// them too, matching its interface and IPv4 address.
	Entries []Entry
	// Log receives the manager's log lines; nil discards them.
	Log *zap.Logger
}

// Entry is a way into the guest besides the tunnel: an interface and the
// guest's IPv4 address on it.
type Entry struct {
	Interface string
	Addr      netip.Addr
}

// Manager keeps the rules of every owner (a container id) of one source.
type Manager struct {
	cfg     Config
	comment string
	ipt     *iptables.IPTables
	log     *zap.Logger

	restore string // iptables-restore, "" when there is none

	mu     sync.Mutex
	owners map[string][]Binding // mu
	refs   map[string]int       // mu: rule (String) -> owners whose bindings have it
	ops    []ruleOp             // mu: the changes of the batch being made

	// The queue of Queue: the latest request of each waiting owner, in
	// the order the owners first asked.
	qmu     sync.Mutex
	pending map[string][]Binding // qmu
	order   []string             // qmu
	gen     uint64               // qmu: Syncs so far; a request from before one is dropped
	wake    chan struct{}
}

// New checks cfg and that iptables runs, and returns a Manager.
func New(cfg Config) (*Manager, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Iptables == "" {
		cfg.Iptables = DefaultIptables
	}
	if cfg.Owner == "" || strings.ContainsFunc(cfg.Owner, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}) {
		return nil, fmt.Errorf("loopback NAT owner %q is not a name of letters, digits, '-' and '_'", cfg.Owner)
	}
	if !cfg.GuestIP.Is4() {
		return nil, fmt.Errorf("loopback NAT guest address %q is not an IPv4 address", cfg.GuestIP)
	}
	if cfg.Interface == "" {
		return nil, errors.New("loopback NAT rules need the interface toward the host")
	}
	for _, e := range cfg.Entries {
		if e.Interface == "" || !e.Addr.Is4() {
			return nil, fmt.Errorf("loopback NAT entry %q %q needs an interface and an IPv4 address", e.Interface, e.Addr)
		}
	}
	ipt, err := iptables.New(iptables.Timeout(5), iptables.Path(cfg.Iptables))
	if err != nil {
		return nil, fmt.Errorf("loopback NAT rules need iptables: %w", err)
	}
	restore, err := exec.LookPath(cfg.Iptables + "-restore")
	if err != nil {
		restore = ""
		cfg.Log.Debug("no iptables-restore beside iptables; one iptables run per rule", zap.String("iptables", cfg.Iptables))
	}
	return &Manager{cfg: cfg, comment: OwnerComment(cfg.Owner), ipt: ipt, restore: restore, log: cfg.Log, owners: map[string][]Binding{}, refs: map[string]int{},
		pending: map[string][]Binding{}, wake: make(chan struct{}, 1)}, nil
}

// Comment returns the comment on the manager's rules.
func (m *Manager) Comment() string { return m.comment }

// rule is one iptables rule: its chain and spec.
type rule struct {
	chain string
	spec  []string
}

// String renders r as `iptables -t nat -S` prints it, but without quotes.
func (r rule) String() string { return "-A " + r.chain + " " + strings.Join(r.spec, " ") }

func (m *Manager) rules(b Binding) []rule {
	chain := cmp.Or(b.Chain, m.cfg.Chain)
	proto := string(b.Protocol)
	port := strconv.Itoa(int(b.HostPort))
	ruleAt := func(iface string, addr netip.Addr) rule {
		// In the order iptables prints them, so that Sync recognises them.
		return rule{chain, []string{
			"-d", addr.String() + "/32", "-i", iface,
			"-p", proto, "-m", proto, "--dport", port,
			"-m", "comment", "--comment", m.comment,
			"-j", "DNAT", "--to-destination", b.Backend.String(),
		}}
	}
	out := []rule{ruleAt(m.cfg.Interface, m.cfg.GuestIP)}
	for _, e := range m.cfg.Entries {
		if e.Interface != m.cfg.Interface || e.Addr != m.cfg.GuestIP {
			out = append(out, ruleAt(e.Interface, e.Addr))
		}
	}
	return out
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
	m.set(owner, bs)
	return m.flush()
}

// set adds to the batch the changes that make owner's rules those of bs.
func (m *Manager) set(owner string, bs []Binding) { m.setKnown(owner, bs, nil) }

// setKnown is set when the rules in present (by String) are known to be
// in the table and every other rule is known to be missing unless an
// owner holds it, as Sync knows after listing the chains. With present
// nil, the manager's own record of its owners says what is there.
//
// It adds the changes to the batch (m.ops), which flush applies: an
// append of a rule no owner held, or a delete, once the last owner lets
// it go, whose "no such rule" answer means it is gone already; a binding
// the owner keeps, or one another owner holds too, costs nothing.
// iptables reads the whole nat table on every run, so a check (-C)
// before each append or delete would double what every container's
// start and stop costs.
func (m *Manager) setKnown(owner string, bs []Binding, present map[string]bool) {
	bs = slices.DeleteFunc(slices.Clone(bs), func(b Binding) bool { return !Valid(b) })
	old := m.owners[owner]
	for _, b := range old {
		if slices.Contains(bs, b) {
			continue
		}
		for _, r := range m.rules(b) {
			if m.release(r.String()) {
				m.ops = append(m.ops, ruleOp{r, false})
			}
		}
	}
	for _, b := range bs {
		if slices.Contains(old, b) {
			continue
		}
		for _, r := range m.rules(b) {
			if m.hold(r.String()) && !present[r.String()] {
				m.ops = append(m.ops, ruleOp{r, true})
			}
		}
	}
	if len(bs) == 0 {
		delete(m.owners, owner)
	} else {
		m.owners[owner] = bs
	}
}

// ruleOp is one change of a batch: an append of r, or its delete.
type ruleOp struct {
	r   rule
	add bool
}

// flush applies the batch's changes and empties it: in one run of
// iptables-restore (--noflush: only these rules change, atomically) when
// there is one and the batch has more than one change, else, or when
// that run fails (a rule to delete was gone already, say), one iptables
// run per change. The caller holds m.mu.
func (m *Manager) flush() error {
	ops := m.ops
	m.ops = m.ops[:0]
	if len(ops) == 0 {
		return nil
	}
	if m.restore != "" && len(ops) > 1 {
		err := m.restoreAll(ops)
		if err == nil {
			for _, op := range ops {
				m.log.Debug("loopback NAT rule", zap.Bool("add", op.add), zap.Stringer("rule", op.r))
			}
			return nil
		}
		m.log.Debug("iptables-restore refused the batch; applying it rule by rule", zap.Error(err), zap.Int("rules", len(ops)))
	}
	var errs []error
	for _, op := range ops {
		errs = append(errs, m.apply(op.r, op.add)...)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("loopback NAT rules: %w", err)
	}
	return nil
}

// restoreAll applies ops in one iptables-restore run.
func (m *Manager) restoreAll(ops []ruleOp) error {
	var in bytes.Buffer
	in.WriteString("*nat\n")
	for _, op := range ops {
		verb := "-A "
		if !op.add {
			verb = "-D "
		}
		in.WriteString(verb + op.r.chain)
		for _, a := range op.r.spec {
			in.WriteByte(' ')
			in.WriteString(restoreQuote(a))
		}
		in.WriteByte('\n')
	}
	in.WriteString("COMMIT\n")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, m.restore, "--noflush", "--wait=5")
	cmd.Stdin = &in
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", m.restore, err, bytes.TrimSpace(out))
	}
	return nil
}

// restoreQuote quotes a for iptables-restore, which splits its lines at
// spaces and honours double quotes.
func restoreQuote(a string) string {
	if a != "" && !strings.ContainsAny(a, " \t\"'\\") {
		return a
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(a) + `"`
}

// hold counts one more owner of rule and reports whether it is the first.
func (m *Manager) hold(rule string) bool {
	m.refs[rule]++
	return m.refs[rule] == 1
}

// release counts one owner of rule less and reports whether it was the
// last.
func (m *Manager) release(rule string) bool {
	m.refs[rule]--
	if m.refs[rule] > 0 {
		return false
	}
	delete(m.refs, rule)
	return true
}

// apply appends r or deletes it.
func (m *Manager) apply(r rule, add bool) []error {
	var err error
	if add {
		err = m.ipt.Append("nat", r.chain, r.spec...)
	} else if err = m.ipt.Delete("nat", r.chain, r.spec...); isNotExist(err) {
		err = nil // gone already (an engine that restarted flushed its chain)
	}
	if err != nil {
		return []error{fmt.Errorf("%s: %w", r, err)}
	}
	m.log.Debug("loopback NAT rule", zap.Bool("add", add), zap.Stringer("rule", r))
	return nil
}

// Remove deletes owner's rules.
func (m *Manager) Remove(owner string) error { return m.Set(owner, nil) }

// Sync makes the rules match all, owner by owner, dropping the queued
// requests (see Queue), and deletes the rules
// that no owner wants: those with the manager's own comment (left by an
// earlier run), and those with the bare CommentPrefix. The latter come
// from agent versions that tagged no owner; no running manager writes
// them, and they match traffic from anywhere, so whichever manager syncs
// first removes them (the other then finds them gone). Rules of other
// owners are left alone. The chains searched are PREROUTING, POSTROUTING,
// Config.Chain and the chains of the bindings in all; the per-container
// chains of containers that are gone went with them.
func (m *Manager) Sync(all map[string][]Binding) error {
	// all supersedes every queued request.
	m.qmu.Lock()
	m.gen++
	clear(m.pending)
	m.order = nil
	m.qmu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	want := map[string]bool{}
	chains := []string{"PREROUTING", "POSTROUTING"}
	if m.cfg.Chain != "" {
		chains = append(chains, m.cfg.Chain)
	}
	for _, bs := range all {
		for _, b := range bs {
			if !Valid(b) {
				continue
			}
			for _, r := range m.rules(b) {
				want[r.String()] = true
			}
			if b.Chain != "" && !slices.Contains(chains, b.Chain) {
				chains = append(chains, b.Chain)
			}
		}
	}
	var errs []error
	present := map[string]bool{} // wanted rules the table has
	for _, chain := range chains {
		listed, err := m.ipt.List("nat", chain)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing nat %s: %w", chain, err))
			continue
		}
		for _, line := range listed {
			f := fields(line)
			if len(f) < 3 || f[0] != "-A" {
				continue
			}
			if rule := strings.Join(f, " "); want[rule] {
				present[rule] = true
				continue
			}
			if c, _ := commentOf(f); c != m.comment && c != CommentPrefix {
				continue
			}
			m.log.Info("removing leftover loopback NAT rule", zap.String("rule", line))
			// Another manager may have deleted an untagged rule just now.
			if err := m.ipt.Delete("nat", f[1], f[2:]...); err != nil && !isNotExist(err) {
				errs = append(errs, fmt.Errorf("deleting %s: %w", line, err))
			}
		}
	}
	if len(errs) > 0 {
		// A chain could not be listed: what it has is not known, so
		// every wanted rule is checked before it is added.
		present = nil
	}
	// The rules were just reconciled: the owners are counted afresh.
	clear(m.owners)
	clear(m.refs)
	m.ops = m.ops[:0]
	for owner, bs := range all {
		if present != nil {
			m.setKnown(owner, bs, present)
		} else if err := m.setUnknown(owner, bs); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, m.flush())
	return errors.Join(errs...)
}

// setUnknown makes owner's rules those of bs, checking each rule of bs
// before it is added (the table's content is not known).
func (m *Manager) setUnknown(owner string, bs []Binding) error {
	bs = slices.DeleteFunc(slices.Clone(bs), func(b Binding) bool { return !Valid(b) })
	var errs []error
	for _, b := range bs {
		for _, r := range m.rules(b) {
			if !m.hold(r.String()) {
				continue
			}
			if err := m.ipt.AppendUnique("nat", r.chain, r.spec...); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", r, err))
			}
		}
	}
	if len(bs) > 0 {
		m.owners[owner] = bs
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("loopback NAT rules for %s: %w", owner, err)
	}
	return nil
}

func isNotExist(err error) bool {
	var e *iptables.Error
	return errors.As(err, &e) && e.IsNotExist()
}

// commentOf returns the argument of the --comment in a rule's fields.
func commentOf(fields []string) (string, bool) {
	i := slices.Index(fields, "--comment")
	if i < 0 || i+1 >= len(fields) {
		return "", false
	}
	return fields[i+1], true
}

// fields splits a line of `iptables -S` into its arguments, without the
// double quotes and backslash escapes iptables puts into comments that
// hold anything but letters, digits, '-' and '_'.
func fields(line string) []string {
	var out []string
	var b strings.Builder
	in, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\' && i+1 < len(line):
			i++
			b.WriteByte(line[i])
		case c == '"':
			quoted = !quoted
			in = true
		case !quoted && (c == ' ' || c == '\t'):
			if in {
				out = append(out, b.String())
				b.Reset()
				in = false
			}
		default:
			b.WriteByte(c)
			in = true
		}
	}
	if in {
		out = append(out, b.String())
	}
	return out
}
