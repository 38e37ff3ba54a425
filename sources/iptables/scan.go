package iptables

import (
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"time"

	"github.com/google/nftables"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// Pacing of the scans that change notifications trigger.
const (
	// coalesceDelay is how long a notified scan waits after the first
	// notification of a burst, so that changes made by several commands in
	// a row (the CNI portmap plugin runs a few) are read by one scan. It
	// is not extended by later notifications: a steady stream of them
	// cannot hold a scan back.
	coalesceDelay = 20 * time.Millisecond
	// notifyCostFactor is k: scanning earns credit at 1/k of the time
	// passing and every notified scan spends its duration, so that while
	// changes keep coming the notified scans take at most 1/k (10%) of
	// the time, plus scanBurst. A notified scan waits until the credit is
	// no longer negative: k times the overdraft.
	notifyCostFactor = 10
	// scanBurst is the most credit there is: cheap scans of sporadic
	// changes run at once, and a costly scan (tens of thousands of rules)
	// is followed by about k times its duration without scans.
	scanBurst = 100 * time.Millisecond
)

// pacer decides when a notified scan runs.
type pacer struct {
	armed  bool          // a notified scan is due
	credit time.Duration // scan time that may be spent now
	at     time.Time     // when credit was brought up to date
}

// refill brings the credit up to now: full at the first call.
func (p *pacer) refill(now time.Time) {
	if p.at.IsZero() {
		p.credit = scanBurst
	} else {
		p.credit = min(scanBurst, p.credit+now.Sub(p.at)/notifyCostFactor)
	}
	p.at = now
}

// changed notes a change notified at now. It returns how long to wait
// before scanning, and false when a scan is already due (it will read
// this change too).
func (p *pacer) changed(now time.Time) (time.Duration, bool) {
	if p.armed {
		return 0, false
	}
	p.armed = true
	p.refill(now)
	return max(coalesceDelay, -p.credit*notifyCostFactor), true
}

// scanned notes a scan, notified or periodic, that ran from start to end:
// it read every change notified before it started. A notified scan spends
// its duration; the others (the first, and the periodic ones, which are
// paced by nextScan) do not, so that a costly periodic dump does not hold
// back the next change.
func (p *pacer) scanned(start, end time.Time, notified bool) {
	p.armed = false
	p.refill(end)
	if notified {
		p.credit -= end.Sub(start)
	}
}

// nftRecheck is how many scan intervals may pass without nftables being
// read in full while its change notifications work: they are the news of
// its changes (and carry iptables-nft's rule changes whole), so a periodic
// scan reads only the legacy back-end, and kube-proxy's maps and
// iptables-nft's chains (dumped anew) again every nftRecheck intervals, or
// scanCostFactor times what reading them took if longer, in case.
const nftRecheck = 10

// scanCostFactor bounds the periodic scans to about 1/scanCostFactor of a
// core: with tens of thousands of rules one scan takes seconds.
const scanCostFactor = 20

// nextScan is the wait before the next periodic scan, after one that took
// took: the interval, or longer when scans are costly. Change
// notifications still trigger a scan at once.
func nextScan(interval, took time.Duration) time.Duration {
	return max(interval, scanCostFactor*took)
}

// scanLoop scans once, then again on the interval (stretched by nextScan)
// and after each change signalled on changed (paced by a pacer), until
// ctx is done.
func (s *Source) scanLoop(ctx context.Context, out core.Emitter, ls *listeners, changed <-chan struct{}) {
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
			return
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
		if !s.cfg.NoListeners {
			ls.update(added, removed)
		}
	} else {
		ms := make([]core.Mapping, 0, len(ports))
		for _, p := range ports {
			ms = append(ms, s.mapping(p))
		}
		out.Snapshot(ms)
		if !s.cfg.NoListeners {
			ls.sync(ports)
		}
	}
	st.reported, st.digest, st.ports = true, digest, ports
	s.log.Debug("NAT rules scanned", zap.Int("service_ports", len(ports)))
}

// mapping is the mapping that reports p, bound at the listen address
// when its rules bind none.
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

// digest sums what r holds: the same digest, the same rules.
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

// parse returns the service ports of every rule set in r, merged.
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
