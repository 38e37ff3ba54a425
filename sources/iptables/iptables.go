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
	"crypto/sha256"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "service ports in kube-proxy's and CNI's NAT rules (iptables and nftables), with listeners",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			cmds := fs.StringSlice("iptablesCommands", nil, "iptables commands run per scan as CMD -t nat -S CHAIN in --iptablesNetns, in place of the legacy back-end's iptables-legacy-save and ip6tables-legacy-save (run by default where the namespace has a legacy nat table); iptables-nft rules are read over netlink either way")
			every := fs.Duration("iptablesScanInterval", 3*time.Second, "time between two periodic scans, or 20 times what a scan takes if longer; while nftables change notifications work they read kube-proxy's maps and dump iptables-nft's chains only every 10 intervals (or 20 times what that takes), as each change to the chains and maps read triggers a scan 20 ms later (paced to at most about a tenth of a core) and iptables-nft's rule changes are taken from the notifications")
			listen := fs.Bool("iptablesListeners", true, "open a listener on each service port found, as kubelet no longer does")
			netns := fs.String("iptablesNetns", "", "network namespace (path) whose rules are scanned, on every back-end; empty for the agent's own")
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
	// Commands are iptables commands run per scan, as `CMD -t nat -S
	// CHAIN` inside Netns, in place of iptables-legacy-save and
	// ip6tables-legacy-save; empty reads the legacy back-end with those
	// where the namespace has a legacy nat table. The rules of iptables-nft
	// are read over netlink either way.
	Commands []string
	// Interval is the time between periodic scans; it stretches to
	// scanCostFactor times a scan's duration when that is longer.
	Interval time.Duration
	// Listen opens a listener on each port found.
	Listen bool
	// Netns is the path of the network namespace whose rules are read
	// (over netlink, and by the legacy commands, which run there); empty
	// for the current one.
	Netns string
	// ListenAddr is where service ports are bound on the host (the
	// --k8sServiceListenerAddr) and where listeners open.
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

// New checks cfg and returns a Source. It fails when a command of
// cfg.Commands cannot be run.
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
	if cfg.Netns != "" {
		if _, err := os.Stat(cfg.Netns); err != nil {
			return nil, fmt.Errorf("--iptablesNetns: %w", err)
		}
	}
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

// Run scans until ctx is done.
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
	periodic := time.NewTimer(s.cfg.Interval)
	defer periodic.Stop()
	notified := time.NewTimer(time.Hour)
	notified.Stop()
	defer notified.Stop()

	var p pacer
	st := &scanState{}
	// scan scans; notifiedScan tells whether notifications brought it,
	// and so whether it spends the pacer's credit.
	scan := func(notifiedScan bool) {
		notified.Stop()
		start := time.Now()
		ch := s.changes.drain()
		watching := s.watching.Load()
		due := func(last time.Time, cost time.Duration) bool {
			return !watching || start.Sub(last) >= max(nftRecheck*s.cfg.Interval, scanCostFactor*cost)
		}
		if due(st.natRead, st.natCost) {
			ch.lost = true // dump iptables-nft's chains again
		}
		readMaps := ch.maps || ch.lost || due(st.mapsRead, st.mapsCost)
		s.scan(out, ls, st, ch, readMaps)
		end := time.Now()
		s.busy.Add(int64(end.Sub(start)))
		p.scanned(start, end, notifiedScan)
		periodic.Reset(nextScan(s.cfg.Interval, end.Sub(start)))
	}
	scan(false)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			if wait, ok := p.changed(time.Now()); ok {
				notified.Reset(wait)
			}
		case <-notified.C:
			scan(true)
		case <-periodic.C:
			scan(false)
		}
	}
}

// nftRecheck is how many scan intervals may pass without nftables being
// read in full while its change notifications work: they are the news of
// its changes (and carry iptables-nft's rule changes whole), so a periodic
// scan reads only the legacy back-end, and kube-proxy's maps and
// iptables-nft's chains (dumped anew) again every nftRecheck intervals, or
// scanCostFactor times what reading them took if longer, in case.
const nftRecheck = 10

// watchRetry is the wait before the notification socket is opened again
// after it failed.
const watchRetry = 5 * time.Second

// watch runs watchNft until ctx is done, opening the socket again when
// it fails (and then scanning, as changes may have been missed). ready is
// closed once the first socket listens, or the first attempt failed.
func (s *Source) watch(ctx context.Context, changed chan<- struct{}, ready chan<- struct{}) {
	signal := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	var once sync.Once
	isReady := func() { once.Do(func() { close(ready) }) }
	defer isReady()
	for first := true; ; first = false {
		err := watchNft(ctx, s.cfg.Netns, &s.changes, signal, func() {
			s.watching.Store(true)
			isReady()
			if !first {
				s.log.Info("nftables change notifications back")
				signal()
			}
		})
		s.watching.Store(false)
		if ctx.Err() != nil {
			return
		}
		isReady()
		s.log.Info("nftables change notifications unavailable; scanning on the interval", zap.Error(err), zap.Duration("retry_in", watchRetry))
		select {
		case <-ctx.Done():
			return
		case <-time.After(watchRetry):
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
	ports    []ServicePort   // reported, as parse returned them
	failing  map[string]bool // sources of rules that failed last time

	// kube-proxy's maps when last read, kept for the scans that need not
	// read them again, and when that was and what it took.
	maps     []nftMap
	mapsErr  error
	mapsRead time.Time
	mapsCost time.Duration

	// iptables-nft's chains, and when they were last dumped in full and
	// what that took.
	nat     natCache
	natRead time.Time
	natCost time.Duration
}

// scan reads every rule set, and reports and listens only if they changed.
func (s *Source) scan(out core.Emitter, ls *listeners, st *scanState, ch natChanges, readMaps bool) {
	s.scans.Add(1)
	raw, problems := s.read(st, ch, readMaps)
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
	if len(problems) > 0 && len(raw.lines) == 0 && len(raw.nat) == 0 && len(raw.nft) == 0 && st.reported {
		return // keep what was reported rather than remove everything on a failed read
	}
	digest := raw.digest()
	if st.reported && digest == st.digest {
		return
	}
	ports := raw.parse()
	if st.reported {
		// Only what changed: with tens of thousands of ports, a snapshot
		// (and a pass over every listener) costs more than the scan.
		added, removed := diffPorts(st.ports, ports)
		for _, p := range removed {
			out.Delete(p.ID())
		}
		for _, p := range added {
			out.Set(s.mapping(p))
		}
		if s.cfg.Listen {
			ls.update(added, removed)
		}
	} else {
		ms := make([]core.Mapping, 0, len(ports))
		for _, p := range ports {
			ms = append(ms, s.mapping(p))
		}
		out.Snapshot(ms)
		if s.cfg.Listen {
			ls.sync(ports)
		}
	}
	st.reported, st.digest, st.ports = true, digest, ports
	s.log.Debug("NAT rules scanned", zap.Int("service_ports", len(ports)))
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
	lines []string // `iptables -S` lines of the legacy back-end
	// nat is the service ports of iptables-nft's chains, by chain (each
	// with rules), from a natCache: sorted, with repeats.
	nat [][]ServicePort
	// natVersion is the natCache's version: the same version, the same
	// rules.
	natVersion uint64
	nft        []nftMap // kube-proxy's maps
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
	fmt.Fprintf(h, "nat %d\n", r.natVersion)
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
	legacy, _ := ParseIptables(r.lines)
	lists := append([][]ServicePort{legacy}, r.nat...)
	for _, m := range r.nft {
		switch m.name {
		case "service-nodeports":
			lists = append(lists, ParseNodePorts(m.elems))
		case "service-ips":
			n := 4
			if m.family == nftables.TableFamilyIPv6 {
				n = 16
			}
			lists = append(lists, ParseServiceIPs(m.elems, n))
		}
	}
	return mergePorts(lists...)
}

// read reads the chains that matter from every iptables back-end and the
// kube-proxy nftables maps: iptables-nft's chains from st's natCache,
// brought up to date with ch (and dumped where it does not hold them, or
// anew when ch.lost), and the maps only when readMaps is set, else what st
// kept of them. A missing chain or table is not a problem: kube-proxy may
// use the other mode, or not run yet.
func (s *Source) read(st *scanState, ch natChanges, readMaps bool) (rawRules, map[string]error) {
	problems := map[string]error{}
	if readMaps {
		start := time.Now()
		st.maps, st.mapsErr = s.readMaps()
		st.mapsRead, st.mapsCost = start, time.Since(start)
	}
	if st.mapsErr != nil {
		problems["nftables"] = st.mapsErr
	}
	r := rawRules{nft: st.maps}

	start := time.Now()
	full := ch.lost || st.nat.chains == nil
	st.nat.apply(ch)
	var d *ruleDumper
	chains, err := st.nat.read(func() (chainDumper, error) {
		var err error
		d, err = newRuleDumper(s.cfg.Netns)
		return d, err
	})
	if d != nil {
		_ = d.Close()
	}
	if full {
		st.natRead, st.natCost = start, time.Since(start)
	}
	if err != nil {
		problems["iptables-nft"] = err
	} else {
		for _, chain := range chains {
			ports, _ := chain.classified()
			r.nat = append(r.nat, ports)
		}
		r.natVersion = st.nat.version
	}

	var more map[string]error
	if len(s.cmds) > 0 {
		r.lines, more = readCommands(s.cfg.Netns, s.cmds)
	} else {
		r.lines, more = readLegacy(s.cfg.Netns, s.legacy)
	}
	maps.Copy(problems, more)
	return r, problems
}

// readMaps reads kube-proxy's maps.
func (s *Source) readMaps() ([]nftMap, error) {
	conn, done, err := s.nftConn()
	if err != nil {
		return nil, err
	}
	defer done()
	return readNftables(conn)
}

// nftConn opens a netlink connection for one scan, in the namespace.
func (s *Source) nftConn() (*nftables.Conn, func(), error) {
	opts := []nftables.ConnOption{nftables.AsLasting()}
	var f *os.File
	if s.cfg.Netns != "" {
		var err error
		if f, err = os.Open(s.cfg.Netns); err != nil {
			return nil, nil, fmt.Errorf("opening network namespace: %w", err)
		}
		opts = append(opts, nftables.WithNetNSFd(int(f.Fd())))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, nil, err
	}
	return c, func() {
		_ = c.CloseLasting()
		if f != nil {
			f.Close()
		}
	}, nil
}

// kubeProxyMaps are the verdict maps of kube-proxy's nftables mode that the
// source reads.
var kubeProxyMaps = []string{"service-nodeports", "service-ips"}

// readNftables reads the verdict maps of the ip and ip6 kube-proxy tables.
func readNftables(conn *nftables.Conn) ([]nftMap, error) {
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
		for _, name := range kubeProxyMaps {
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

type closer interface{ Close() error }

// listeners holds a socket on each service port, so the port shows as in
// use (and is forwarded by WSL) while kube-proxy's rules route the traffic.
type listeners struct {
	addr netip.Addr
	log  *zap.Logger
	// want counts the reported ports that need each listener (a NodePort
	// and a hostPort on the listen address share one), by key; open and
	// pending are the wanted listeners that are open and those that are
	// not (yet, or could not be).
	want    map[string]int
	open    map[string]closer
	pending map[string]pendingListener
}

// pendingListener is a wanted listener that is not open, and whether its
// failure to open was logged.
type pendingListener struct {
	port   ServicePort
	warned bool
}

func newListeners(addr netip.Addr, log *zap.Logger) *listeners {
	return &listeners{addr: addr, log: log, want: map[string]int{}, open: map[string]closer{}, pending: map[string]pendingListener{}}
}

// wantOpen notes that the listener of key k, for p, should be open.
func (l *listeners) wantOpen(k string, p ServicePort) {
	if _, ok := l.pending[k]; !ok && l.open[k] == nil {
		l.pending[k] = pendingListener{port: p}
	}
}

// sync makes the listeners those that ports need, and tries again the
// ones that could not be opened.
func (l *listeners) sync(ports []ServicePort) {
	want := map[string]int{}
	for _, p := range ports {
		if listened(p) {
			want[l.key(p)]++
		}
	}
	for k := range l.want {
		if want[k] == 0 {
			l.drop(k)
		}
	}
	l.want = want
	for _, p := range ports {
		if listened(p) {
			l.wantOpen(l.key(p), p)
		}
	}
	l.retry()
}

// update adds the listeners the added ports need and closes those that
// only the removed ports needed (as diffPorts gives them), and tries again
// the ones that could not be opened.
func (l *listeners) update(added, removed []ServicePort) {
	for _, p := range removed {
		if !listened(p) {
			continue
		}
		k := l.key(p)
		if l.want[k]--; l.want[k] <= 0 {
			delete(l.want, k)
			l.drop(k)
		}
	}
	for _, p := range added {
		if !listened(p) {
			continue
		}
		k := l.key(p)
		l.want[k]++
		l.wantOpen(k, p)
	}
	l.retry()
}

func listened(p ServicePort) bool { return p.Protocol == core.TCP || p.Protocol == core.UDP }

// drop closes the listener of key k, if it is open, and forgets it.
func (l *listeners) drop(k string) {
	if c, ok := l.open[k]; ok {
		_ = c.Close()
		delete(l.open, k)
		l.log.Debug("listener closed", zap.String("listener", k))
	}
	delete(l.pending, k)
}

// retry opens the wanted listeners that are not open; each failure is
// logged the first time.
func (l *listeners) retry() {
	for k, w := range l.pending {
		c, err := l.listen(w.port)
		if err != nil {
			if !w.warned {
				l.log.Warn("cannot open listener; port left to its current owner", zap.String("listener", k), zap.Error(err))
				l.pending[k] = pendingListener{port: w.port, warned: true}
			}
			continue
		}
		delete(l.pending, k)
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
