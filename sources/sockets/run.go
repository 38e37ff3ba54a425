package sockets

import (
	"context"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

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
	every := s.cfg.Interval // between dumps no wake-up asked for
	if wake != nil {
		defer wake.close()
		woken, stopped = wake.C, wake.Stopped
		if wake.UDP {
			every = s.cfg.Recheck
		}
	}
	d := &dumper{netns: s.cfg.Netns}
	defer d.close()
	relays := newRelays(s.cfg, s.relayAt, s.log)
	defer relays.close()
	s.live.Store(relays)
	defer s.live.Store(nil)
	links := relays.watchLinks()
	defer links.close()
	// The status line: how the source watches, and the relays' load when
	// it changed (at most once a second from the relays' signal; each
	// dump looks again).
	var shown RelayLoad
	var shownAt time.Time
	status := func(force bool) {
		l := relays.loadNow()
		if !force && (l == shown || time.Since(shownAt) < time.Second) {
			return
		}
		shown, shownAt = l, time.Now()
		if relays == nil {
			describe(out, how)
		} else {
			describe(out, how+"; "+l.String())
		}
	}
	status(true)
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
		case <-relays.loadChanged():
			status(false)
			continue
		case <-links.C():
			relays.refresh()
			continue
		case <-stopped:
			s.log.Warn("eBPF wake-ups stopped; reading sockets by the periodic dump alone", zap.Error(wake.Err))
			woken, stopped = nil, nil
			if every != s.cfg.Interval {
				every = s.cfg.Interval
				if due.After(time.Now().Add(every)) {
					due = time.Now().Add(every)
					timer.Reset(every)
				}
			}
			how = fmt.Sprintf("sock_diag dump every %s (eBPF wake-ups stopped: %v)", s.cfg.Interval, wake.Err)
			status(true)
			continue
		}
		if s.onDump != nil {
			s.onDump(byWake)
		}
		status(false)
		byWake = false
		wait := every
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
		if firstDump.IsZero() && wake != nil && wake.UDP {
			// Sockets bound before the wake-ups began; later ones
			// the wake-ups note themselves.
			wake.noteUDP(udpCookies(socks))
		}
		if wake != nil && wake.UDP && woken != nil {
			// A UDP socket whose port the kernel picked (a client's) is
			// no claim; the programs tell which ones a process bound.
			socks = slices.DeleteFunc(socks, func(sk Socket) bool {
				return sk.Protocol == core.UDP && sk.Cookie != 0 && !wake.serves(sk.Cookie)
			})
		}
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
	f, filtered := s.wakeFilter()
	w, err := loadWakeups(f)
	if err != nil {
		if s.cfg.Wakeups == WakeupsEBPF {
			return nil, "", fmt.Errorf("eBPF wake-ups (--socketsWakeups=%s): %w", WakeupsEBPF, err)
		}
		s.log.Warn("eBPF wake-ups unavailable; reading sockets by a periodic sock_diag dump alone",
			zap.Error(err), zap.Duration("interval", s.cfg.Interval), zap.Duration("settle", s.cfg.Settle))
		return nil, fmt.Sprintf("%s (eBPF wake-ups unavailable: %v)", poll, err), nil
	}
	if w.UDP {
		s.log.Info("reading sockets by sock_diag dumps that eBPF wake-ups trigger when a TCP listener or a bound UDP socket opens or closes, and every recheck interval as a safety net",
			zap.Duration("recheck_interval", s.cfg.Recheck), zap.Duration("settle", s.cfg.Settle), zap.String("wake_ups_from", filtered))
		return w, fmt.Sprintf("sock_diag dump on eBPF wake-ups (TCP listeners and bound UDP sockets of %s: %s tracepoint, cgroup socket programs) and every %s", filtered, tracepoint, s.cfg.Recheck), nil
	}
	s.log.Info("reading sockets by sock_diag dumps that eBPF wake-ups trigger when a TCP listener opens or closes, and every interval (UDP sockets, and as a safety net)",
		zap.Duration("interval", s.cfg.Interval), zap.Duration("settle", s.cfg.Settle), zap.String("wake_ups_from", filtered), zap.NamedError("udp_wake_ups", w.UDPErr))
	return w, fmt.Sprintf("sock_diag dump on eBPF wake-ups (TCP listeners of %s, %s tracepoint) and every %s (no UDP wake-ups: %v)", filtered, tracepoint, s.cfg.Interval, w.UDPErr), nil
}

// wakeFilter is what the eBPF program leaves out: the listeners of other
// network namespaces, where the kernel's BTF says how to tell them, and
// those of ExcludeCommands. It says in words whose listeners wake a dump.
func (s *Source) wakeFilter() (wakeFilter, string) {
	var f wakeFilter
	for _, c := range s.cfg.ExcludeCommands {
		if len(c) <= 15 { // longer names never match a task's (15-byte) one
			f.comms = append(f.comms, c)
		}
	}
	f.netnsCookie, f.cookieErr = netnsCookie(s.cfg.Netns)
	ino, err := netnsInode(s.cfg.Netns)
	if err == nil {
		f.sockNet, f.netInum, err = kernelOffsets()
	}
	if err != nil {
		s.log.Info("eBPF wake-ups cannot tell network namespaces apart; a listener in any of them wakes a dump", zap.Error(err))
		return f, "every network namespace"
	}
	f.netns = ino
	return f, "this network namespace"
}

// udpCookies returns the cookies of the UDP sockets of a dump.
func udpCookies(socks []Socket) []uint64 {
	var out []uint64
	for _, sk := range socks {
		if sk.Protocol == core.UDP && sk.Cookie != 0 {
			out = append(out, sk.Cookie)
		}
	}
	return out
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
