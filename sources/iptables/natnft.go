package iptables

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"net/netip"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// natChains are the chains of the nat table the source reads, besides the
// CNI-DN-* chains that CNI-HOSTPORT-DNAT jumps to.
var natChains = []string{"KUBE-NODEPORTS", "KUBE-SERVICES", "CNI-HOSTPORT-DNAT"}

// natFamilies are the nftables families whose nat table iptables-nft and
// ip6tables-nft write.
var natFamilies = []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

// readNatNft reads the rules of the chains the source reads from the nat
// tables iptables-nft and ip6tables-nft keep in nftables, over netlink, and
// decodes them into what `iptables -S` would print of them. A missing table
// or chain reads as no rules.
func readNatNft(d *ruleDumper) ([]rule, error) {
	var out []rule
	for _, family := range natFamilies {
		table := &nftables.Table{Name: "nat", Family: family}
		start := len(out)
		read := func(chain string) error {
			rs, err := d.rules(table, chain)
			if err != nil {
				return fmt.Errorf("%s nat %s: %w", familyName(family), chain, err)
			}
			out = append(out, rs...)
			return nil
		}
		for _, chain := range natChains {
			if err := read(chain); err != nil {
				return nil, err
			}
		}
		_, cni := portsOf(out[start:])
		for _, chain := range cni {
			if err := read(chain); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}

// loaded is what a register holds: a meta key or a slice of a header,
// possibly masked.
type loaded struct {
	meta   expr.MetaKey
	base   expr.PayloadBase
	offset uint32
	len    uint32
	mask   []byte
	valid  bool
}

// Where iptables-nft matches what the parser reads (struct iphdr and
// struct ipv6hdr, then the port fields of tcp, udp and sctp headers).
const (
	ip4ProtoOffset = 9
	ip4DstOffset   = 16
	ip6NextOffset  = 6
	ip6DstOffset   = 24
	dportOffset    = 2
)

// decodeRule turns the expressions iptables-nft writes for a rule into the
// arguments `iptables -S` prints for it: native meta and payload loads
// compared with cmp or range (-p, -d, --dport), the compat comment, tcp,
// udp and sctp matches, and the jump, goto, verdict or compat target.
func decodeRule(family nftables.TableFamily, chain string, exprs []expr.Any) rule {
	r := rule{chain: chain}
	addrLen, dstOffset, protoOffset := 4, uint32(ip4DstOffset), uint32(ip4ProtoOffset)
	if family == nftables.TableFamilyIPv6 {
		addrLen, dstOffset, protoOffset = 16, ip6DstOffset, ip6NextOffset
	}
	var regs [unix.NFT_REG32_15 + 1]loaded
	reg := func(n uint32) *loaded {
		if int(n) < len(regs) {
			return &regs[n]
		}
		return &loaded{}
	}
	var rangeLow string // the low end of a --dport range written as two cmps
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if !e.SourceRegister {
				*reg(e.Register) = loaded{meta: e.Key, valid: true}
			}
		case *expr.Payload:
			if e.OperationType == expr.PayloadLoad {
				*reg(e.DestRegister) = loaded{base: e.Base, offset: e.Offset, len: e.Len, valid: true}
			}
		case *expr.Bitwise:
			l := *reg(e.SourceRegister)
			l.mask = e.Mask
			*reg(e.DestRegister) = l
		case *expr.Cmp:
			l := reg(e.Register)
			if !l.valid {
				continue
			}
			switch {
			case l.meta == expr.MetaKeyL4PROTO && l.base == 0 && len(e.Data) == 1,
				l.meta == 0 && l.base == expr.PayloadBaseNetworkHeader && l.offset == protoOffset && l.len == 1 && len(e.Data) == 1:
				r.proto = protoName(e.Data[0])
			case l.meta == 0 && l.base == expr.PayloadBaseNetworkHeader && l.offset == dstOffset && l.len <= uint32(addrLen):
				r.dest = addrArg(e.Data, l.mask, addrLen)
			case l.meta == 0 && l.base == expr.PayloadBaseTransportHeader && l.offset == 0 && l.len == 4 && len(e.Data) == 4:
				// --sport and --dport, both single and not negated, are
				// one load of both fields.
				r.dport = strconv.Itoa(int(binary.BigEndian.Uint16(e.Data[dportOffset:])))
			case l.meta == 0 && l.base == expr.PayloadBaseTransportHeader && l.offset == dportOffset && l.len == 2 && len(e.Data) == 2:
				port := strconv.Itoa(int(binary.BigEndian.Uint16(e.Data)))
				switch e.Op {
				case expr.CmpOpGte:
					rangeLow = port
				case expr.CmpOpLte:
					if rangeLow != "" {
						r.dport = rangeLow + ":" + port
					}
				default:
					r.dport = port
				}
			}
		case *expr.Range:
			l := reg(e.Register)
			if l.valid && l.meta == 0 && l.base == expr.PayloadBaseTransportHeader && l.offset == dportOffset && len(e.FromData) == 2 && len(e.ToData) == 2 {
				r.dport = portRange(binary.BigEndian.Uint16(e.FromData), binary.BigEndian.Uint16(e.ToData))
			}
		case *expr.Match:
			decodeMatch(&r, e)
		case *expr.Target:
			r.target = e.Name
		case *expr.Verdict:
			r.target = verdictTarget(e)
		case *expr.NAT:
			switch e.Type {
			case expr.NATTypeDestNAT:
				r.target = "DNAT"
			case expr.NATTypeSourceNAT:
				r.target = "SNAT"
			}
		case *expr.Masq:
			r.target = "MASQUERADE"
		case *expr.Redir:
			r.target = "REDIRECT"
		}
	}
	return r
}

// decodeMatch reads the compat matches the parser needs.
func decodeMatch(r *rule, m *expr.Match) {
	switch info := m.Info.(type) {
	case *xt.Comment:
		r.comment = string(*info)
	case *xt.Tcp:
		if p, ok := compatPorts(info.DstPorts, info.InvFlags&xt.TcpInvDestPorts != 0); ok {
			r.dport = p
		}
	case *xt.Udp:
		if p, ok := compatPorts(info.DstPorts, info.InvFlags&xt.UdpInvDestPorts != 0); ok {
			r.dport = p
		}
	case *xt.Unknown:
		if m.Name == "sctp" {
			if p, ok := sctpPorts(*info); ok {
				r.dport = p
			}
		}
	}
}

// compatPorts is what the tcp and udp matches print for a port range: a
// --dport unless the range is all ports and not negated.
func compatPorts(p [2]uint16, inverted bool) (string, bool) {
	if p[0] == 0 && p[1] == 0xffff && !inverted {
		return "", false
	}
	return portRange(p[0], p[1]), true
}

// struct xt_sctp_info: dpts[2], spts[2], chunkmap[64], chunk_match_type,
// flag_info[4] (3 bytes each), flag_count, flags, invflags; host byte order.
const (
	sctpFlagsOffset = 4 + 4 + 64*4 + 4 + 4*3 + 4
	sctpDestPorts   = 0x02 // XT_SCTP_DEST_PORTS
)

func sctpPorts(info []byte) (string, bool) {
	if len(info) < sctpFlagsOffset+4 {
		return "", false
	}
	if binary.NativeEndian.Uint32(info[sctpFlagsOffset:])&sctpDestPorts == 0 {
		return "", false
	}
	return portRange(binary.NativeEndian.Uint16(info[0:]), binary.NativeEndian.Uint16(info[2:])), true
}

func portRange(lo, hi uint16) string {
	if lo == hi {
		return strconv.Itoa(int(lo))
	}
	return strconv.Itoa(int(lo)) + ":" + strconv.Itoa(int(hi))
}

// addrArg prints a destination match as iptables does: the address and its
// prefix length, or its mask when that is not a prefix.
func addrArg(data, mask []byte, addrLen int) string {
	b := make([]byte, addrLen)
	copy(b, data)
	m := make([]byte, addrLen)
	if mask == nil {
		for i := range min(len(data), addrLen) {
			m[i] = 0xff
		}
	} else {
		copy(m, mask)
	}
	addr, _ := netip.AddrFromSlice(b)
	ones := 0
	for _, x := range m {
		ones += bits.OnesCount8(x)
	}
	prefixMask := make([]byte, addrLen)
	for i := range ones {
		prefixMask[i/8] |= 0x80 >> (i % 8)
	}
	if string(prefixMask) != string(m) {
		maskAddr, _ := netip.AddrFromSlice(m)
		return addr.String() + "/" + maskAddr.String()
	}
	return netip.PrefixFrom(addr, ones).String()
}

// protoName is the name iptables prints for an IP protocol number.
func protoName(p byte) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_SCTP:
		return "sctp"
	case unix.IPPROTO_UDPLITE:
		return "udplite"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_ICMPV6:
		return "ipv6-icmp"
	case unix.IPPROTO_ESP:
		return "esp"
	case unix.IPPROTO_AH:
		return "ah"
	}
	return strconv.Itoa(int(p))
}

// verdictTarget is the -j or -g argument of a verdict.
func verdictTarget(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictJump, expr.VerdictGoto:
		return v.Chain
	case expr.VerdictAccept:
		return "ACCEPT"
	case expr.VerdictDrop:
		return "DROP"
	case expr.VerdictReturn:
		return "RETURN"
	case expr.VerdictQueue:
		return "QUEUE"
	}
	return ""
}
