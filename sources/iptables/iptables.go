// Package iptables is the source that scans the kernel's NAT rules for the
// service ports kube-proxy exposes — in iptables mode (KUBE-NODEPORTS and
// KUBE-SERVICES, through go-iptables, on the nft and legacy back-ends) and
// in nftables mode (the kube-proxy table's service-nodeports and
// service-ips maps, over netlink) — and the hostPorts of the CNI portmap
// plugin, leaving out the loopback NAT rules the container sources add to
// CNI's chains. It rescans at once when nftables reports a change and at least
// every scan interval, re-parses only when the rules changed, and opens
// the listeners kubelet no longer creates for the ports it finds.
package iptables

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "iptables"

func init() {
	registry.RegisterSource(registry.Source{
		Name:    Name,
		Summary: "service ports in kube-proxy's and CNI's NAT rules (iptables and nftables), with listeners",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			cmds := fs.StringSlice("iptablesCommands", nil, "iptables commands to scan (default: iptables-nft and iptables-legacy where installed, else iptables)")
			every := fs.Duration("iptablesScanInterval", 3*time.Second, "time between two periodic scans, or 20 times what a scan takes if longer; nftables changes trigger a scan at once")
			listen := fs.Bool("iptablesListeners", true, "open a listener on each service port found, as kubelet no longer does")
			netns := fs.String("iptablesNetns", "", "network namespace (path) whose rules are scanned; empty for the agent's own")
			return func(env registry.Env) (core.Source, error) {
				if *every <= 0 {
					return nil, fmt.Errorf("--iptablesScanInterval must be positive, got %s", *every)
				}
				return New(Config{
					Commands: *cmds, Interval: *every, Listen: *listen, Netns: *netns,
					ListenAddr: env.Options.K8sServiceListenerAddr, Log: env.Log,
				})
			}
		},
	})
}

// Config configures a Source.
type Config struct {
	// Commands are the iptables commands to scan; empty picks iptables-nft
	// and iptables-legacy where installed, else iptables.
	Commands []string
	// Interval is the time between periodic scans; it stretches to
	// scanCostFactor times a scan's duration when that is longer.
	Interval time.Duration
	// Listen opens a listener on each port found.
	Listen bool
	// Netns is the path of the network namespace to scan; empty for the
	// current one. The iptables commands must already run there.
	Netns string
	// ListenAddr is where service ports are bound on the host (the
	// --k8sServiceListenerAddr) and where listeners open.
	ListenAddr netip.Addr
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source scans NAT rules.
type Source struct {
	cfg Config
	log *zap.Logger
	ipt []backend
}

// backend is one iptables command (nft or legacy).
type backend struct {
	name string
	ipt  *goipt.IPTables
}

// New checks cfg and returns a Source. Commands that are not installed are
// left out; having none at all is fine when nftables is used.
func New(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 3 * time.Second
	}
	if !cfg.ListenAddr.IsValid() {
		cfg.ListenAddr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	s := &Source{cfg: cfg, log: cfg.Log.With(zap.String("source", Name))}
	cmds := cfg.Commands
	if len(cmds) == 0 {
		for _, c := range []string{"iptables-nft", "iptables-legacy"} {
			if _, err := exec.LookPath(c); err == nil {
				cmds = append(cmds, c)
			}
		}
		if len(cmds) == 0 {
			cmds = []string{"iptables"}
		}
	}
	for _, c := range cmds {
		ipt, err := goipt.New(goipt.Path(c), goipt.Timeout(5))
		if err != nil {
			if len(cfg.Commands) > 0 {
				return nil, fmt.Errorf("--iptablesCommands %s: %w", c, err)
			}
			s.log.Info("iptables command unavailable; not scanned", zap.String("command", c), zap.Error(err))
			continue
		}
		s.ipt = append(s.ipt, backend{c, ipt})
	}
	return s, nil
}

// Run scans until ctx is done.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	ls := &listeners{addr: s.cfg.ListenAddr, log: s.log, open: map[string]closer{}, failed: map[string]bool{}}
	defer ls.closeAll()
	changed, stop := s.watchNftables(ctx)
	defer stop()
	periodic := time.NewTimer(s.cfg.Interval)
	defer periodic.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()

	st := &scanState{}
	scan := func() {
		start := time.Now()
		s.scan(out, ls, st)
		periodic.Reset(nextScan(s.cfg.Interval, time.Since(start)))
	}
	scan()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			debounce.Reset(50 * time.Millisecond) // a rule update arrives as a burst
		case <-debounce.C:
			scan()
		case <-periodic.C:
			scan()
		}
	}
}

// scanCostFactor bounds the periodic scans to about 1/scanCostFactor of a
// core: with tens of thousands of rules one scan takes seconds.
const scanCostFactor = 20

// nextScan is the wait before the next periodic scan, after one that took
// took: the interval, or longer when scans are costly. Change
// notifications still trigger a scan at once.
func nextScan(interval, took time.Duration) time.Duration {
	return max(interval, scanCostFactor*took)
}

// scanState is what the previous scan saw.
type scanState struct {
	reported bool
	digest   [sha256.Size]byte
	failing  map[string]bool // sources of rules that failed last time
}

// scan reads every rule set, and reports and listens only if they changed.
func (s *Source) scan(out core.Emitter, ls *listeners, st *scanState) {
	raw, problems := s.read()
	failing := map[string]bool{}
	for what, err := range problems {
		failing[what] = true
		if !st.failing[what] {
			s.log.Warn("cannot read NAT rules; will retry", zap.String("from", what), zap.Error(err))
		}
	}
	for what := range st.failing {
		if !failing[what] {
			s.log.Info("reading NAT rules again", zap.String("from", what))
		}
	}
	st.failing = failing
	if len(problems) > 0 && len(raw.lines) == 0 && len(raw.nft) == 0 && st.reported {
		return // keep what was reported rather than remove everything on a failed read
	}
	digest := raw.digest()
	if st.reported && digest == st.digest {
		return
	}
	ports := raw.parse()
	ms := make([]core.Mapping, 0, len(ports))
	for _, p := range ports {
		ms = append(ms, s.mapping(p))
	}
	out.Snapshot(ms)
	st.reported, st.digest = true, digest
	s.log.Debug("NAT rules scanned", zap.Int("service_ports", len(ports)))
	if s.cfg.Listen {
		ls.sync(ports)
	}
}

func (s *Source) mapping(p ServicePort) core.Mapping {
	ip := p.HostIP
	if !ip.IsValid() {
		ip = s.cfg.ListenAddr
	}
	return core.Mapping{
		Key:   core.Key{Source: Name, ID: p.ID()},
		Ports: []core.Port{{Protocol: p.Protocol, ContainerPort: p.Port, HostIP: ip, HostPort: p.Port}},
	}
}

// rawRules is what one scan read, before parsing.
type rawRules struct {
	lines []string
	nft   []nftMap
}

type nftMap struct {
	family nftables.TableFamily
	name   string
	elems  []NftElement
}

func (r rawRules) digest() [sha256.Size]byte {
	h := sha256.New()
	for _, l := range r.lines {
		h.Write([]byte(l))
		h.Write([]byte{'\n'})
	}
	for _, m := range r.nft {
		fmt.Fprintf(h, "%d %s\n", m.family, m.name)
		for _, e := range m.elems {
			h.Write(e.Key)
			h.Write([]byte(e.Chain))
			h.Write([]byte{0})
		}
	}
	var d [sha256.Size]byte
	h.Sum(d[:0])
	return d
}

func (r rawRules) parse() []ServicePort {
	ports, _ := ParseIptables(r.lines)
	for _, m := range r.nft {
		switch m.name {
		case "service-nodeports":
			ports = append(ports, ParseNodePorts(m.elems)...)
		case "service-ips":
			n := 4
			if m.family == nftables.TableFamilyIPv6 {
				n = 16
			}
			ports = append(ports, ParseServiceIPs(m.elems, n)...)
		}
	}
	return dedupe(ports)
}

// read lists the chains that matter from every iptables back-end and the
// kube-proxy nftables maps. A missing chain or table is not a problem:
// kube-proxy may use the other mode, or not run yet.
func (s *Source) read() (rawRules, map[string]error) {
	var r rawRules
	problems := map[string]error{}
	for _, b := range s.ipt {
		lines, err := listChains(b.ipt, "KUBE-NODEPORTS", "KUBE-SERVICES", "CNI-HOSTPORT-DNAT")
		if err == nil {
			_, cni := ParseIptables(lines)
			var more []string
			more, err = listChains(b.ipt, cni...)
			lines = append(lines, more...)
		}
		if err != nil {
			problems[b.name] = err
			continue
		}
		r.lines = append(r.lines, lines...)
	}
	nft, err := s.readNftables()
	if err != nil {
		problems["nftables"] = err
	}
	r.nft = nft
	return r, problems
}

func listChains(ipt *goipt.IPTables, chains ...string) ([]string, error) {
	var out []string
	for _, c := range chains {
		lines, err := ipt.List("nat", c)
		if err != nil {
			// iptables-nft reports a chain that does not exist as
			// "incompatible"; either way there is nothing to read.
			var e *goipt.Error
			if errors.As(err, &e) && (e.IsNotExist() || strings.Contains(e.Error(), "incompatible")) {
				continue
			}
			return nil, fmt.Errorf("listing nat %s: %w", c, err)
		}
		out = append(out, lines...)
	}
	return out, nil
}

func (s *Source) nftConn() (*nftables.Conn, func(), error) {
	if s.cfg.Netns == "" {
		c, err := nftables.New()
		return c, func() {}, err
	}
	f, err := os.Open(s.cfg.Netns)
	if err != nil {
		return nil, nil, err
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return c, func() { f.Close() }, nil
}

// readNftables reads the verdict maps of the ip and ip6 kube-proxy tables.
func (s *Source) readNftables() ([]nftMap, error) {
	conn, done, err := s.nftConn()
	if err != nil {
		return nil, err
	}
	defer done()
	var out []nftMap
	for _, family := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		tables, err := conn.ListTablesOfFamily(family)
		if err != nil {
			return nil, fmt.Errorf("listing nftables tables: %w", err)
		}
		i := slices.IndexFunc(tables, func(t *nftables.Table) bool { return t.Name == "kube-proxy" })
		if i < 0 {
			continue
		}
		for _, name := range []string{"service-nodeports", "service-ips"} {
			set, err := conn.GetSetByName(tables[i], name)
			if err != nil {
				continue // an older or newer layout without this map
			}
			elems, err := conn.GetSetElements(set)
			if err != nil {
				return nil, fmt.Errorf("reading %s: %w", name, err)
			}
			m := nftMap{family: family, name: name}
			for _, e := range elems {
				if chain := verdictChain(e); chain != "" {
					m.elems = append(m.elems, NftElement{Key: e.Key, Chain: chain})
				}
			}
			out = append(out, m)
		}
	}
	return out, nil
}

// watchNftables subscribes to nftables change notifications. The channel
// gets a value per change; without notifications it never fires and the
// interval scans carry on alone.
func (s *Source) watchNftables(ctx context.Context) (<-chan struct{}, func()) {
	changed := make(chan struct{}, 1)
	conn, done, err := s.nftConn()
	if err != nil {
		s.log.Info("nftables change notifications unavailable; scanning on the interval", zap.Error(err))
		return changed, func() {}
	}
	mon := nftables.NewMonitor(nftables.WithMonitorAction(nftables.MonitorActionAny), nftables.WithMonitorObject(nftables.MonitorObjectAny))
	events, err := conn.AddMonitor(mon)
	if err != nil {
		done()
		s.log.Info("nftables change notifications unavailable; scanning on the interval", zap.Error(err))
		return changed, func() {}
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for ev := range events {
			if ev.Error != nil {
				continue
			}
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	})
	stop := context.AfterFunc(ctx, func() { _ = mon.Close() })
	return changed, func() {
		stop()
		_ = mon.Close()
		wg.Wait()
		done()
	}
}

type closer interface{ Close() error }

// listeners holds a socket on each service port, so the port shows as in
// use (and is forwarded by WSL) while kube-proxy's rules route the traffic.
type listeners struct {
	addr   netip.Addr
	log    *zap.Logger
	open   map[string]closer
	failed map[string]bool
}

func (l *listeners) sync(ports []ServicePort) {
	want := map[string]ServicePort{}
	for _, p := range ports {
		if p.Protocol == core.TCP || p.Protocol == core.UDP {
			want[l.key(p)] = p
		}
	}
	for k, c := range l.open {
		if _, ok := want[k]; !ok {
			_ = c.Close()
			delete(l.open, k)
			l.log.Debug("listener closed", zap.String("listener", k))
		}
	}
	for k := range l.failed {
		if _, ok := want[k]; !ok {
			delete(l.failed, k)
		}
	}
	for k, p := range want {
		if _, ok := l.open[k]; ok {
			continue
		}
		c, err := l.listen(p)
		if err != nil {
			if !l.failed[k] {
				l.log.Warn("cannot open listener; port left to its current owner", zap.String("listener", k), zap.Error(err))
			}
			l.failed[k] = true
			continue
		}
		delete(l.failed, k)
		l.open[k] = c
		l.log.Debug("listener opened", zap.String("listener", k))
	}
}

func (l *listeners) addrOf(p ServicePort) string {
	ip := p.HostIP
	if !ip.IsValid() {
		ip = l.addr
	}
	return netip.AddrPortFrom(ip, p.Port).String()
}

func (l *listeners) key(p ServicePort) string { return string(p.Protocol) + " " + l.addrOf(p) }

func (l *listeners) listen(p ServicePort) (closer, error) {
	if p.Protocol == core.UDP {
		return net.ListenPacket("udp", l.addrOf(p))
	}
	return net.Listen("tcp", l.addrOf(p))
}

func (l *listeners) closeAll() {
	for k, c := range l.open {
		_ = c.Close()
		delete(l.open, k)
	}
}

// Netlink attributes of a verdict (linux/netfilter/nf_tables.h).
const nftaVerdictChain = 2

// verdictChain returns the chain a map element's verdict goes to. The
// nftables package does not decode verdicts of maps with concatenated keys,
// so the raw attributes in Val are read when VerdictData is missing.
func verdictChain(e nftables.SetElement) string {
	if e.VerdictData != nil {
		return e.VerdictData.Chain
	}
	ad, err := netlink.NewAttributeDecoder(e.Val)
	if err != nil {
		return ""
	}
	for ad.Next() {
		if ad.Type() == nftaVerdictChain {
			return strings.TrimRight(ad.String(), "\x00")
		}
	}
	return ""
}
