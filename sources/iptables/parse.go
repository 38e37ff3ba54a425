package iptables

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// Kinds of service ports.
const (
	KindNodePort = "nodeport" // kube-proxy NodePort
	KindExternal = "external" // kube-proxy LoadBalancer / external IP
	KindHostPort = "hostport" // CNI portmap hostPort
)

// ServicePort is a port that kube-proxy or the CNI portmap plugin exposes
// through DNAT.
type ServicePort struct {
	Protocol core.Protocol
	Port     uint16
	// HostIP is set for hostPorts bound to one address (127.0.0.1, say).
	HostIP netip.Addr
	Kind   string
}

// ID is the mapping id of p: the same port found by two scans, or in two
// rule sets, has the same id.
func (p ServicePort) ID() string {
	if p.HostIP.IsValid() {
		return fmt.Sprintf("%s/%s", p.Protocol, netip.AddrPortFrom(p.HostIP, p.Port))
	}
	return fmt.Sprintf("%s/%d", p.Protocol, p.Port)
}

func compareServicePorts(a, b ServicePort) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port), a.HostIP.Compare(b.HostIP), cmp.Compare(a.Kind, b.Kind))
}

// dedupe sorts ports and drops repeats of the same id (a NodePort has a
// KUBE-MARK-MASQ and a KUBE-EXT rule in older kube-proxies, say).
func dedupe(ports []ServicePort) []ServicePort {
	slices.SortFunc(ports, compareServicePorts)
	// The same protocol, port and address is the same id.
	return slices.CompactFunc(ports, func(a, b ServicePort) bool {
		return a.Protocol == b.Protocol && a.Port == b.Port && a.HostIP == b.HostIP
	})
}

// sameID orders service ports by what their ids hold (protocol, port and
// address), as dedupe sorts them.
func sameID(a, b ServicePort) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port), a.HostIP.Compare(b.HostIP))
}

// diffPorts returns the ports of now whose ids were not in before, and
// the ports of before whose ids are not in now; both lists come from
// dedupe.
func diffPorts(before, now []ServicePort) (added, removed []ServicePort) {
	i, j := 0, 0
	for i < len(before) || j < len(now) {
		switch {
		case j == len(now):
			removed = append(removed, before[i])
			i++
		case i == len(before):
			added = append(added, now[j])
			j++
		default:
			switch c := sameID(before[i], now[j]); {
			case c < 0:
				removed = append(removed, before[i])
				i++
			case c > 0:
				added = append(added, now[j])
				j++
			default:
				i++
				j++
			}
		}
	}
	return added, removed
}

// Fields splits an `iptables -S` line into its arguments, honouring the
// double quotes iptables puts around comments with spaces.
func Fields(line string) []string {
	var out []string
	eachToken(line, func(tok string, quoted bool) bool {
		if quoted {
			tok = unescape(tok)
		}
		out = append(out, tok)
		return true
	})
	return out
}

// eachToken calls fn with each argument of line, without its quotes and
// without copying; quoted tells whether it may hold backslash escapes. It
// stops when fn returns false.
func eachToken(line string, fn func(tok string, quoted bool) bool) {
	i := 0
	for i < len(line) {
		for i < len(line) && (line[i] == ' ' || line[i] == '\t') {
			i++
		}
		if i == len(line) {
			return
		}
		if line[i] == '"' {
			j := i + 1
			for j < len(line) && line[j] != '"' {
				if line[j] == '\\' {
					j++
				}
				j++
			}
			if !fn(line[i+1:min(j, len(line))], true) {
				return
			}
			i = j + 1
			continue
		}
		j := i
		for j < len(line) && line[j] != ' ' && line[j] != '\t' {
			j++
		}
		if !fn(line[i:j], false) {
			return
		}
		i = j
	}
}

func unescape(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// rule is the part of an iptables rule the parser needs, as
// `iptables -S` prints it: the chain, the -p, -j (or -g), -d and --dport
// arguments (whether negated or not) and the last --comment.
type rule struct {
	chain, proto, target, dest, dport, comment string
}

func parseRule(line string) (rule, bool) {
	var r rule
	n := 0
	var prev string
	ok := true
	eachToken(line, func(tok string, quoted bool) bool {
		switch {
		case n == 0:
			ok = tok == "-A"
		case n == 1:
			r.chain = tok
		default:
			switch prev {
			case "-p", "--protocol":
				r.proto = tok
			case "-j", "--jump", "-g", "--goto":
				r.target = tok
			case "-d", "--destination":
				r.dest = tok
			case "--dport", "--destination-port":
				r.dport = tok
			case "--comment":
				if quoted {
					tok = unescape(tok)
				}
				r.comment = tok
			}
		}
		prev = tok
		n++
		return ok
	})
	return r, ok && n >= 2
}

// ParseIptables finds the service ports in `iptables -t nat -S` lines of
// the chains KUBE-NODEPORTS, KUBE-SERVICES and CNI-DN-*; other lines are
// ignored, and so are the rules of the container sources' loopback NAT
// (loopbacknat.IsOwnRule), which the agent appends to CNI-DN-* chains: they
// forward what the host sends to a 127.0.0.1 hostPort, and read as
// hostPorts of their own they would widen that port to the guest's address,
// or to every address (the rules of earlier versions). A
// hostPort rule matching one destination address ("-d 127.0.0.1/32") has
// that address as its HostIP. ParseIptables also returns the CNI-DN-*
// chains that CNI-HOSTPORT-DNAT jumps to, so that the caller can list them.
func ParseIptables(lines []string) (ports []ServicePort, cniChains []string) {
	var c classifier
	for _, line := range lines {
		if r, ok := parseRule(line); ok {
			c.add(r)
		}
	}
	return dedupe(c.ports), c.cniChains
}

// portsOf is ParseIptables for rules already decoded (read over netlink),
// given in one or more slices.
func portsOf(rules ...[]rule) (ports []ServicePort, cniChains []string) {
	var c classifier
	for _, rs := range rules {
		for _, r := range rs {
			c.add(r)
		}
	}
	return dedupe(c.ports), c.cniChains
}

// classifier collects the service ports of rules, one at a time.
type classifier struct {
	ports     []ServicePort
	cniChains []string
}

func (c *classifier) add(r rule) {
	p, ok, cni := classify(r)
	switch {
	case ok:
		c.ports = append(c.ports, p)
	case cni != "" && !slices.Contains(c.cniChains, cni):
		c.cniChains = append(c.cniChains, cni)
	}
}

// classify returns the service port of r, if it has one, or the CNI-DN-*
// chain it jumps to from CNI-HOSTPORT-DNAT.
func classify(r rule) (p ServicePort, ok bool, cniChain string) {
	if loopbacknat.IsOwnRule(r.comment) {
		return ServicePort{}, false, ""
	}
	switch {
	case r.chain == "KUBE-NODEPORTS":
		if strings.HasPrefix(r.target, "KUBE-EXT-") || strings.HasPrefix(r.target, "KUBE-SVC-") {
			p, ok = servicePort(r.proto, r.dport, netip.Addr{}, KindNodePort)
		}
	case r.chain == "KUBE-SERVICES":
		if strings.HasPrefix(r.target, "KUBE-EXT-") {
			p, ok = servicePort(r.proto, r.dport, netip.Addr{}, KindExternal)
		}
	case r.chain == "CNI-HOSTPORT-DNAT":
		if strings.HasPrefix(r.target, "CNI-DN-") {
			cniChain = r.target
		}
	case strings.HasPrefix(r.chain, "CNI-DN-"):
		if r.target == "DNAT" {
			p, ok = servicePort(r.proto, r.dport, hostIP(r.dest), KindHostPort)
		}
	}
	return p, ok, cniChain
}

func servicePort(proto, port string, ip netip.Addr, kind string) (ServicePort, bool) {
	p, err := core.ParseProtocol(proto)
	if err != nil || proto == "" {
		return ServicePort{}, false
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return ServicePort{}, false
	}
	return ServicePort{Protocol: p, Port: uint16(n), HostIP: ip, Kind: kind}, true
}

// mergePorts merges lists sorted by compareServicePorts (with repeats)
// into one, without repeats of an id, as dedupe would.
func mergePorts(lists ...[]ServicePort) []ServicePort {
	var out []ServicePort
	for _, l := range lists {
		if len(l) == 0 {
			continue
		}
		merged := make([]ServicePort, 0, len(out)+len(l))
		i, j := 0, 0
		for i < len(out) && j < len(l) {
			if compareServicePorts(out[i], l[j]) <= 0 {
				merged = append(merged, out[i])
				i++
			} else {
				merged = append(merged, l[j])
				j++
			}
		}
		merged = append(append(merged, out[i:]...), l[j:]...)
		out = merged
	}
	return slices.CompactFunc(out, func(a, b ServicePort) bool { return sameID(a, b) == 0 })
}

// hostIP returns the single address of a "-d" match, if it is one.
func hostIP(dest string) netip.Addr {
	if dest == "" {
		return netip.Addr{}
	}
	if p, err := netip.ParsePrefix(dest); err == nil && p.IsSingleIP() {
		return p.Addr()
	}
	if a, err := netip.ParseAddr(dest); err == nil {
		return a
	}
	return netip.Addr{}
}

// NftElement is one element of a kube-proxy verdict map: its key bytes
// and the chain its verdict jumps or goes to.
type NftElement struct {
	Key   []byte
	Chain string
}

// nft concatenations pad every field to a multiple of four bytes.
const nftReg = 4

// ParseNodePorts decodes the elements of kube-proxy's service-nodeports
// map ("inet_proto . inet_service : verdict").
func ParseNodePorts(elems []NftElement) []ServicePort {
	var out []ServicePort
	for _, e := range elems {
		if len(e.Key) < 2*nftReg || !strings.HasPrefix(e.Chain, "external-") {
			continue
		}
		if p, ok := protoPort(e.Key[0], e.Key[nftReg:nftReg+2]); ok {
			out = append(out, ServicePort{Protocol: p.Protocol, Port: p.Port, Kind: KindNodePort})
		}
	}
	return dedupe(out)
}

// ParseServiceIPs decodes the elements of kube-proxy's service-ips map
// ("ipv4_addr|ipv6_addr . inet_proto . inet_service : verdict") and keeps
// the LoadBalancer and external IPs (verdicts to external-* chains).
func ParseServiceIPs(elems []NftElement, addrLen int) []ServicePort {
	var out []ServicePort
	a := (addrLen + nftReg - 1) / nftReg * nftReg
	for _, e := range elems {
		if len(e.Key) < a+2*nftReg || !strings.HasPrefix(e.Chain, "external-") {
			continue
		}
		if p, ok := protoPort(e.Key[a], e.Key[a+nftReg:a+nftReg+2]); ok {
			out = append(out, ServicePort{Protocol: p.Protocol, Port: p.Port, Kind: KindExternal})
		}
	}
	return dedupe(out)
}

// IP protocol numbers.
const (
	ipprotoTCP  = 6
	ipprotoUDP  = 17
	ipprotoSCTP = 132
)

func protoPort(proto byte, port []byte) (ServicePort, bool) {
	var p core.Protocol
	switch proto {
	case ipprotoTCP:
		p = core.TCP
	case ipprotoUDP:
		p = core.UDP
	case ipprotoSCTP:
		p = core.SCTP
	default:
		return ServicePort{}, false
	}
	n := binary.BigEndian.Uint16(port)
	if n == 0 {
		return ServicePort{}, false
	}
	return ServicePort{Protocol: p, Port: n}, true
}
