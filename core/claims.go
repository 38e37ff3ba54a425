package core

import (
	"cmp"
	"net/netip"
	"slices"
)

// portKey is a host port whatever its address.
type portKey struct {
	proto Protocol
	port  uint16
}

// sinkKey is a host port as one sink's peer keys it: ip is the zero Addr
// for peers that key by port alone.
type sinkKey struct {
	proto Protocol
	ip    netip.Addr
	port  uint16
}

// hostAddr is p's host address, with "all addresses" spelled 0.0.0.0.
func hostAddr(p Port) netip.Addr {
	if !p.HostIP.IsValid() {
		return netip.IPv4Unspecified()
	}
	return p.HostIP
}

// claim is one mapping's wish to have one host port exposed.
type claim struct {
	key  Key
	port Port
	conn []ConnectAddr
	seq  uint64 // order of arrival: the earliest claim on an address wins
}

// agrees reports whether c and o lead to the same backend. Peers forward a
// host port to the guest's same port, so only explicit backend addresses
// can make two claims disagree.
func (c claim) agrees(o claim) bool { return slices.Equal(c.conn, o.conn) }

// exposure is what a sink was sent for one of its keys.
type exposure struct {
	Claim        Key           `json:"claim"`
	Port         Port          `json:"port"`
	ConnectAddrs []ConnectAddr `json:"connectAddrs,omitempty"`
}

func (c claim) exposure() exposure {
	return exposure{Claim: c.key, Port: c.port, ConnectAddrs: c.conn}
}

// same reports whether a peer holding e needs nothing sent to hold o: the
// same protocol, host address, host port and backend addresses. The
// container port and the claim do not reach the peer's listener.
func (e exposure) same(o exposure) bool {
	return e.Port.Protocol == o.Port.Protocol && e.Port.HostPort == o.Port.HostPort &&
		hostAddr(e.Port) == hostAddr(o.Port) && slices.Equal(e.ConnectAddrs, o.ConnectAddrs)
}

func (e exposure) change(remove bool) Change {
	return Change{Remove: remove, Mapping: Mapping{Key: e.Claim, Ports: []Port{e.Port}, ConnectAddrs: e.ConnectAddrs}}
}

// ledger holds the claims: the router's account of which sources' mappings
// claim which host ports (what this agent exposed on each sink is the
// ownership record, in ownership.go). The unit of exposure is the host port
// (protocol, host address, host port), not the mapping: every port of every
// admitted mapping is a claim on it. A port is exposed while one claim
// remains and removed when the last one goes, for every sink. Claims on one
// address that agree (same backend addresses) are one exposure; claims that
// disagree are a conflict: the first keeps the port, the others are
// reported and take over, in order, when it goes. It is the Router's, under
// Router.mu.
type ledger struct {
	seq    uint64
	byPort map[portKey][]claim // each list in order of arrival
}

func newLedger() *ledger { return &ledger{byPort: map[portKey][]claim{}} }

// update replaces the claims of key k (the ports of old) with those of m
// and returns the ports whose claims changed.
func (l *ledger) update(k Key, old, m Mapping) []Port {
	var touched []Port
	for _, p := range old.Ports {
		if !slices.Contains(m.Ports, p) || !slices.Equal(old.ConnectAddrs, m.ConnectAddrs) {
			l.drop(k, p)
			touched = append(touched, p)
		}
	}
	for _, p := range m.Ports {
		if !slices.Contains(old.Ports, p) || !slices.Equal(old.ConnectAddrs, m.ConnectAddrs) {
			l.seq++
			pk := portKey{p.Protocol, p.HostPort}
			l.byPort[pk] = append(l.byPort[pk], claim{key: k, port: p, conn: m.ConnectAddrs, seq: l.seq})
			touched = append(touched, p)
		}
	}
	return touched
}

func (l *ledger) drop(k Key, p Port) {
	pk := portKey{p.Protocol, p.HostPort}
	cs := slices.DeleteFunc(l.byPort[pk], func(c claim) bool { return c.key == k && c.port == p })
	if len(cs) == 0 {
		delete(l.byPort, pk)
	} else {
		l.byPort[pk] = cs
	}
}

func compareSinkKeys(a, b sinkKey) int {
	return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port), a.ip.Compare(b.ip))
}

func comparePortKeys(a, b portKey) int {
	return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port))
}
