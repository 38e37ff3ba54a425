package iptables

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
)

// Why iptables-nft's rules are kept rather than read at every scan: the
// kernel sends a dump of a chain in parts of at most 32 KiB (about 47
// iptables-nft rules), and for each part walks the chain again from its
// first rule, so that dumping a chain costs in proportion to the square of
// its length. 50,000 services (a KUBE-NODEPORTS and a KUBE-SERVICES rule
// each) take seconds of kernel time to dump, whoever reads them (`iptables
// -S` too). The change notifications carry each added and deleted rule
// whole, so the source dumps the chains once and then follows the
// notifications: a scan after a change costs what the change holds, not
// what the chains hold.

// ruleOpKind is what a ruleOp does.
type ruleOpKind uint8

const (
	opAdd      ruleOpKind = iota // a rule added (NFT_MSG_NEWRULE)
	opDelete                     // a rule deleted (NFT_MSG_DELRULE)
	opClear                      // a chain deleted (NFT_MSG_DELCHAIN): no rules
	opClearAll                   // the family's nat table deleted: no chain has rules
	opReload                     // the chain must be dumped again
)

// ruleOp is one change to a nat chain the source reads, from a
// notification.
type ruleOp struct {
	gen    uint32 // the generation its transaction committed (NFTA_GEN_ID)
	kind   ruleOpKind
	family nftables.TableFamily
	chain  string
	handle uint64
	rule   rule
}

// ruleLog carries the rule changes that notifications report from the
// watcher to the scans, which apply them to their natCache.
type ruleLog struct {
	mu   sync.Mutex
	ops  []ruleOp
	lost bool // changes were not recorded: the chains must be dumped again
	maps bool // a kube-proxy map changed
}

// maxLoggedOps bounds the changes kept between two scans: past it the log
// forgets them and the next scan dumps the chains again.
const maxLoggedOps = 1 << 18

// add records the relevant changes of one committed transaction.
func (l *ruleLog) add(ops []ruleOp, maps bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.maps = l.maps || maps
	if l.lost {
		return
	}
	if len(l.ops)+len(ops) > maxLoggedOps {
		l.ops, l.lost = nil, true
		return
	}
	l.ops = append(l.ops, ops...)
}

// markLost records that changes may have been missed (the socket
// overflowed, or was opened again).
func (l *ruleLog) markLost() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ops, l.lost, l.maps = nil, true, true
}

// natChanges is what a scan takes from the log.
type natChanges struct {
	ops  []ruleOp
	lost bool
	maps bool
}

func (l *ruleLog) drain() natChanges {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := natChanges{ops: l.ops, lost: l.lost, maps: l.maps}
	l.ops, l.lost, l.maps = nil, false, false
	return c
}

// newer tells whether generation a comes after b (generations are a
// 32-bit counter that may wrap).
func newer(a, b uint32) bool { return int32(a-b) > 0 }

type chainKey struct {
	family nftables.TableFamily
	name   string
}

// natChain is a chain's rules as of generation gen.
type natChain struct {
	gen   uint32
	rules map[uint64]rule // by handle
	list  []rule          // the rules in no particular order; nil after a change
	// ports is the service ports of the rules, one per rule that has
	// one, sorted by compareServicePorts; cni counts the rules that jump
	// to each CNI-DN-* chain. Both follow the changes one at a time, and
	// are made again from the rules when more than maxIncremental come
	// between two scans (valid unset).
	ports []ServicePort
	cni   map[string]int
	valid bool
	ops   int // changes followed one at a time since the last scan
}

// maxIncremental is how many changes to a chain between two scans are
// followed one at a time (each moves the chain's ports once): past it,
// the ports are made again from the rules.
const maxIncremental = 64

func newNatChain(gen uint32, rules map[uint64]rule) *natChain {
	return &natChain{gen: gen, rules: rules}
}

// put adds (or replaces) the rule of handle h.
func (c *natChain) put(h uint64, r rule) {
	if old, ok := c.rules[h]; ok {
		c.follow(old, -1)
	}
	c.rules[h] = r
	c.follow(r, 1)
}

// remove deletes the rule of handle h.
func (c *natChain) remove(h uint64) {
	if old, ok := c.rules[h]; ok {
		delete(c.rules, h)
		c.follow(old, -1)
	}
}

// clear deletes every rule.
func (c *natChain) clear() {
	c.rules, c.list = map[uint64]rule{}, nil
	c.ports, c.cni, c.valid = nil, nil, true
}

// follow updates the ports and CNI-DN-* targets for r added (by 1) or
// removed (by -1).
func (c *natChain) follow(r rule, by int) {
	c.list = nil
	if !c.valid {
		return
	}
	if c.ops++; c.ops > maxIncremental {
		c.valid = false
		return
	}
	p, ok, cni := classify(r)
	switch {
	case ok && by > 0:
		i, _ := slices.BinarySearchFunc(c.ports, p, compareServicePorts)
		c.ports = slices.Insert(c.ports, i, p)
	case ok:
		if i, found := slices.BinarySearchFunc(c.ports, p, compareServicePorts); found {
			c.ports = slices.Delete(c.ports, i, i+1)
		}
	case cni != "":
		if c.cni == nil {
			c.cni = map[string]int{}
		}
		if c.cni[cni] += by; c.cni[cni] <= 0 {
			delete(c.cni, cni)
		}
	}
}

// classified returns the chain's service ports (sorted, with a port
// repeated for each rule that has it; valid until the chain next changes)
// and the CNI-DN-* chains its rules jump to.
func (c *natChain) classified() ([]ServicePort, []string) {
	if !c.valid {
		c.ports, c.cni = nil, nil
		for _, r := range c.rules {
			if p, ok, cni := classify(r); ok {
				c.ports = append(c.ports, p)
			} else if cni != "" {
				if c.cni == nil {
					c.cni = map[string]int{}
				}
				c.cni[cni]++
			}
		}
		slices.SortFunc(c.ports, compareServicePorts)
		c.valid = true
	}
	c.ops = 0
	return c.ports, slices.Sorted(maps.Keys(c.cni))
}

func (c *natChain) all() []rule {
	if c.list == nil && len(c.rules) > 0 {
		c.list = make([]rule, 0, len(c.rules))
		for _, r := range c.rules {
			c.list = append(c.list, r)
		}
	}
	return c.list
}

// natCache holds the rules of the nat chains the source reads in both
// families: those of natChains always, and the CNI-DN-* chains while
// CNI-HOSTPORT-DNAT jumps to them. A chain's rules come from a dump and
// then from the notified changes committed after the generation the dump
// saw (changes of that generation or before are in the dump already).
type natCache struct {
	chains map[chainKey]*natChain
	// version changes whenever the rules do.
	version uint64
}

// apply applies the notified changes, in the order they were committed.
// lost drops every chain, to be dumped again.
func (c *natCache) apply(ch natChanges) {
	if c.chains == nil || ch.lost {
		c.chains = map[chainKey]*natChain{}
		c.version++
	}
	if len(ch.ops) == 0 {
		return
	}
	for _, op := range ch.ops {
		if op.kind == opClearAll {
			for k, chain := range c.chains {
				if k.family == op.family && newer(op.gen, chain.gen) && len(chain.rules) > 0 {
					chain.clear()
					c.version++
				}
			}
			continue
		}
		k := chainKey{op.family, op.chain}
		chain := c.chains[k]
		if chain == nil || !newer(op.gen, chain.gen) {
			continue // not kept, or in its dump already
		}
		switch op.kind {
		case opAdd:
			chain.put(op.handle, op.rule)
		case opDelete:
			chain.remove(op.handle)
		case opClear:
			chain.clear()
		case opReload:
			delete(c.chains, k)
		}
		c.version++
	}
	// Every kept chain is now as of the last change's generation: the
	// changes in between that it did not see did not touch it.
	last := ch.ops[len(ch.ops)-1].gen
	for _, chain := range c.chains {
		if newer(last, chain.gen) {
			chain.gen = last
		}
	}
}

// chainDumper dumps a chain, with the generation it saw.
type chainDumper interface {
	generation() (uint32, error)
	handledRules(table *nftables.Table, chain string) ([]handledRule, bool, error)
}

// handledRule is a rule with its handle.
type handledRule struct {
	handle uint64
	rule   rule
}

// read dumps the chains the source reads that the cache does not hold,
// with d (opened, by open, only when a dump is needed), drops the CNI-DN-*
// chains no longer jumped to, and returns every chain read that has rules.
func (c *natCache) read(open func() (chainDumper, error)) ([]*natChain, error) {
	if c.chains == nil {
		c.chains = map[chainKey]*natChain{}
	}
	var d chainDumper
	load := func(k chainKey) (*natChain, error) {
		if chain := c.chains[k]; chain != nil {
			return chain, nil
		}
		if d == nil {
			var err error
			if d, err = open(); err != nil {
				return nil, err
			}
		}
		// A change committed after the generation is read and before the
		// dump is both in the dump and applied on top of it, which is
		// harmless: it adds or deletes what the dump has or lacks already.
		gen, err := d.generation()
		if err != nil {
			return nil, fmt.Errorf("%s nat: %w", familyName(k.family), err)
		}
		rs, consistent, err := d.handledRules(&nftables.Table{Name: "nat", Family: k.family}, k.name)
		if err != nil {
			return nil, fmt.Errorf("%s nat %s: %w", familyName(k.family), k.name, err)
		}
		rules := make(map[uint64]rule, len(rs))
		for _, r := range rs {
			rules[r.handle] = r.rule
		}
		chain := newNatChain(gen, rules)
		c.version++
		if consistent {
			c.chains[k] = chain
		} // else the chain changed while read, every time: read it again next scan
		return chain, nil
	}
	var out []*natChain
	referenced := map[chainKey]bool{}
	for _, family := range natFamilies {
		var cni []string
		for _, name := range natChains {
			chain, err := load(chainKey{family, name})
			if err != nil {
				return nil, err
			}
			if len(chain.rules) > 0 {
				out = append(out, chain)
				if name == "CNI-HOSTPORT-DNAT" {
					_, cni = chain.classified()
				}
			}
		}
		for _, name := range cni {
			k := chainKey{family, name}
			referenced[k] = true
			chain, err := load(k)
			if err != nil {
				return nil, err
			}
			if len(chain.rules) > 0 {
				out = append(out, chain)
			}
		}
	}
	for k := range c.chains {
		if strings.HasPrefix(k.name, "CNI-DN-") && !referenced[k] {
			delete(c.chains, k)
		}
	}
	return out, nil
}
