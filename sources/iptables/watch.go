package iptables

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Netlink message types and attributes of nf_tables
// (linux/netfilter/nf_tables.h) that the watcher reads.
const (
	// The first attribute of tables is the name; of chains, rules, sets
	// and set element lists, the table; the second (third for chains)
	// is the object's name or, for rules, the chain.
	nftaTableName   = 1
	nftaOwnerTable  = 1
	nftaRuleChain   = 2
	nftaSetName     = 2
	nftaElemSetName = 2
	nftaChainName   = 3
)

// relevant tells whether a change notification of msgType (NFT_MSG_*)
// for an object of family (NFPROTO_*) in table, named name (the chain of
// a rule, the set of an element), touches what the source reads: the ip
// and ip6 nat tables' chains that it reads, and the kube-proxy tables'
// service maps. Docker's filter rules, kube-proxy's other chains and any
// other table are not. A new table is empty, so only its deletion counts.
func relevant(family uint8, msgType uint16, table, name string) bool {
	if family != unix.NFPROTO_IPV4 && family != unix.NFPROTO_IPV6 {
		return false
	}
	switch table {
	case "nat":
		switch msgType {
		case unix.NFT_MSG_DELTABLE:
			return true
		case unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN, unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
			return slices.Contains(natChains, name) || strings.HasPrefix(name, "CNI-DN-")
		}
	case "kube-proxy":
		switch msgType {
		case unix.NFT_MSG_DELTABLE:
			return true
		case unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET, unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
			return slices.Contains(kubeProxyMaps, name)
		}
	}
	return false
}

// destroyed maps the NFT_MSG_DESTROY* types (Linux 6.3; a delete that
// does not fail when the object is missing) to the deletes they stand for,
// in case the kernel notifies them under their own type.
var destroyed = map[uint16]uint16{
	26: unix.NFT_MSG_DELTABLE,   // NFT_MSG_DESTROYTABLE
	27: unix.NFT_MSG_DELCHAIN,   // NFT_MSG_DESTROYCHAIN
	28: unix.NFT_MSG_DELRULE,    // NFT_MSG_DESTROYRULE
	29: unix.NFT_MSG_DELSET,     // NFT_MSG_DESTROYSET
	30: unix.NFT_MSG_DELSETELEM, // NFT_MSG_DESTROYSETELEM
}

// notice is what a notification is about: the family, message type,
// table and name relevant reads.
type notice struct {
	family  uint8
	msgType uint16
	table   string
	name    string
}

// decodeNotice decodes the family, table and name of a notification; ok is
// false for messages that are not about tables, chains, rules, sets or set
// elements.
func decodeNotice(m netlink.Message) (n notice, ok bool) {
	typ := uint16(m.Header.Type)
	if typ>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < sizeofNfgenmsg {
		return notice{}, false
	}
	n.family, n.msgType = m.Data[0], typ&0xff
	if del, ok := destroyed[n.msgType]; ok {
		n.msgType = del // what destroy removed, delete would have
	}
	tableAttr, nameAttr := uint16(nftaOwnerTable), uint16(0)
	switch n.msgType {
	case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE:
		tableAttr = nftaTableName
	case unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN:
		nameAttr = nftaChainName
	case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
		nameAttr = nftaRuleChain
	case unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET:
		nameAttr = nftaSetName
	case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
		nameAttr = nftaElemSetName
	default:
		return notice{}, false
	}
	a := attrs{b: m.Data[sizeofNfgenmsg:]}
	for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
		switch typ {
		case tableAttr:
			n.table = string(cstring(v))
		case nameAttr:
			n.name = string(cstring(v))
		}
	}
	return n, true
}

// transaction collects the relevant notifications of one transaction
// until its NFT_MSG_NEWGEN.
type transaction struct {
	relevant bool
	maps     bool // a kube-proxy map changed
	ops      []ruleOp
	bad      bool // a rule change could not be decoded
}

// note reads one notification.
func (t *transaction) note(m netlink.Message) {
	n, ok := decodeNotice(m)
	if !ok || !relevant(n.family, n.msgType, n.table, n.name) {
		return
	}
	t.relevant = true
	if n.table != "nat" {
		t.maps = true
		return
	}
	family := nftables.TableFamily(n.family)
	switch n.msgType {
	case unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE:
		r, handle, err := decodeRule(family, n.name, m.Data)
		if err != nil {
			t.bad = true
			return
		}
		kind := opAdd
		if n.msgType == unix.NFT_MSG_DELRULE {
			kind = opDelete
		}
		t.ops = append(t.ops, ruleOp{kind: kind, family: family, chain: n.name, handle: handle, rule: r})
	case unix.NFT_MSG_DELCHAIN:
		t.ops = append(t.ops, ruleOp{kind: opClear, family: family, chain: n.name})
	case unix.NFT_MSG_DELTABLE:
		t.ops = append(t.ops, ruleOp{kind: opClearAll, family: family})
	}
}

// commit dates the transaction's changes with its generation. A rule
// replaced in place (iptables -R) is notified as its new version added
// and its old one deleted, under one handle; as the same handle added and
// deleted could also be a rule that came and went, such a chain is dumped
// again instead.
func (t *transaction) commit(gen uint32) []ruleOp {
	type ruleKey struct {
		chainKey
		handle uint64
	}
	added := map[ruleKey]bool{}
	reload := map[chainKey]bool{}
	for _, op := range t.ops {
		k := ruleKey{chainKey{op.family, op.chain}, op.handle}
		switch op.kind {
		case opAdd:
			added[k] = true
		case opDelete:
			if added[k] {
				reload[k.chainKey] = true
			}
		}
	}
	ops := t.ops[:0]
	for _, op := range t.ops {
		k := chainKey{op.family, op.chain}
		if reload[k] {
			if op.kind == opAdd || op.kind == opDelete {
				continue
			}
		}
		op.gen = gen
		ops = append(ops, op)
	}
	for k := range reload {
		ops = append(ops, ruleOp{gen: gen, kind: opReload, family: k.family, chain: k.name})
	}
	return ops
}

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

// watchBuffer is the receive buffer of the notification socket: a
// restore of a large rule set sends a message per rule.
const watchBuffer = 8 << 20

// watchNft reads the nftables change notifications of the namespace at
// netns ("" for the current one) until ctx is done or the socket fails,
// and calls changed once per committed transaction that touched something
// relevant, and whenever notifications were lost (the socket overflowed).
// If log is not nil, it also records there the changes of each such
// transaction to the nat chains the source reads, and the losses. ready,
// if not nil, is called once the socket listens.
func watchNft(ctx context.Context, netns string, log *ruleLog, changed, ready func()) error {
	var cfg netlink.Config
	if netns != "" {
		f, err := os.Open(netns)
		if err != nil {
			return fmt.Errorf("opening network namespace: %w", err)
		}
		defer f.Close()
		cfg.NetNS = int(f.Fd())
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &cfg)
	if err != nil {
		return fmt.Errorf("opening a netfilter socket: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer func() {
		if stop() {
			_ = c.Close()
		}
	}()
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		return fmt.Errorf("subscribing to nftables changes: %w", err)
	}
	setReadBuffer(c, watchBuffer)
	if log != nil {
		log.markLost() // what changed before now is read by dumps
	}
	if ready != nil {
		ready()
	}
	var t transaction
	for {
		msgs, err := c.Receive()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, unix.ENOBUFS) {
				t = transaction{}
				if log != nil {
					log.markLost()
				}
				changed()
				continue
			}
			return fmt.Errorf("reading nftables changes: %w", err)
		}
		for _, m := range msgs {
			// NFT_MSG_NEWGEN ends the notifications of a transaction.
			if uint16(m.Header.Type) != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN {
				t.note(m)
				continue
			}
			if t.relevant {
				if log != nil {
					if gen, ok := genID(m); !ok || t.bad {
						log.markLost()
					} else {
						log.add(t.commit(gen), t.maps)
					}
				}
				changed()
			}
			t = transaction{}
		}
	}
}

// setReadBuffer sets the socket's receive buffer, past net.core.rmem_max
// where the agent may (it has CAP_NET_ADMIN). It is best effort: an
// overflow is noticed and answered with a scan.
func setReadBuffer(c *netlink.Conn, n int) {
	if raw, err := c.SyscallConn(); err == nil {
		var serr error
		if err := raw.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
		}); err == nil && serr == nil {
			return
		}
	}
	_ = c.SetReadBuffer(n)
}
