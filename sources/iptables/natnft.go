package iptables

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/bits"
	"net/netip"
	"strconv"

	"github.com/google/nftables"
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
// or chain reads as no rules. It reads every chain; scans keep a natCache
// instead.
func readNatNft(d *ruleDumper) ([]rule, error) {
	var c natCache
	chains, err := c.read(func() (chainDumper, error) { return d, nil })
	if err != nil {
		return nil, err
	}
	var out []rule
	for _, chain := range chains {
		out = append(out, chain.all()...)
	}
	return out, nil
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}

// attrs walks the netlink attributes of a message or of a nested
// attribute, without copying: each payload is a slice of the buffer read.
type attrs struct {
	b   []byte
	bad bool // an attribute's length runs past the end
}

// next returns the next attribute's type (without the nested and byte
// order flags) and payload, and false at the end.
func (a *attrs) next() (uint16, []byte, bool) {
	if len(a.b) < unix.SizeofNlAttr {
		if len(a.b) > 0 {
			a.bad = true
		}
		return 0, nil, false
	}
	n := int(binary.NativeEndian.Uint16(a.b))
	if n < unix.SizeofNlAttr || n > len(a.b) {
		a.bad = true
		return 0, nil, false
	}
	typ := binary.NativeEndian.Uint16(a.b[2:]) & nlaTypeMask
	data := a.b[unix.SizeofNlAttr:n]
	a.b = a.b[min((n+unix.NLA_ALIGNTO-1)&^(unix.NLA_ALIGNTO-1), len(a.b)):]
	return typ, data, true
}

// nlaTypeMask clears the NLA_F_NESTED and NLA_F_NET_BYTEORDER flags of an
// attribute type; sizeofNfgenmsg is the header of nfnetlink messages.
const (
	nlaTypeMask    = 0x3fff
	sizeofNfgenmsg = 4
)

// be32 is a big-endian 32-bit attribute (registers, keys, offsets, codes).
func be32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

// dataValue is the NFTA_DATA_VALUE inside a nested NFTA_*_DATA attribute.
func dataValue(b []byte) []byte {
	a := attrs{b: b}
	if typ, v, ok := a.next(); ok && typ == unix.NFTA_DATA_VALUE {
		return v
	}
	return nil
}

// cstring is a NUL-terminated string attribute, as bytes.
func cstring(b []byte) []byte { return bytes.TrimRight(b, "\x00") }

// loaded is what a register holds: a meta key or a slice of a header,
// possibly masked (the mask is a slice of the message being decoded).
type loaded struct {
	meta   uint32
	base   uint32
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

// Verdict codes (linux/netfilter.h and nf_tables.h).
const (
	verdictDrop   = 0
	verdictAccept = 1
	verdictQueue  = 3
)

// decodeRule turns a rule message (NFT_MSG_NEWRULE, from a dump or a
// notification: the nfgenmsg header, then the rule's attributes) as
// iptables-nft writes it into the arguments `iptables -S` prints for it:
// native meta and payload loads compared with cmp or range (-p, -d,
// --dport), the compat comment, tcp, udp and sctp matches, and the jump,
// goto, verdict or compat target. It also returns the rule's handle. It
// reads the attributes in place and copies only the strings it keeps;
// expressions of other kinds (counters, say) are skipped.
func decodeRule(family nftables.TableFamily, chain string, msg []byte) (rule, uint64, error) {
	if len(msg) < sizeofNfgenmsg {
		return rule{}, 0, errors.New("short message")
	}
	d := ruleDecoder{r: rule{chain: chain}, addrLen: 4, dstOffset: ip4DstOffset, protoOffset: ip4ProtoOffset}
	if family == nftables.TableFamilyIPv6 {
		d.addrLen, d.dstOffset, d.protoOffset = 16, ip6DstOffset, ip6NextOffset
	}
	var handle uint64
	top := attrs{b: msg[sizeofNfgenmsg:]}
	for typ, v, ok := top.next(); ok; typ, v, ok = top.next() {
		switch typ {
		case unix.NFTA_RULE_HANDLE:
			if len(v) == 8 {
				handle = binary.BigEndian.Uint64(v)
			}
		case unix.NFTA_RULE_EXPRESSIONS:
			list := attrs{b: v}
			for typ, el, ok := list.next(); ok; typ, el, ok = list.next() {
				if typ != unix.NFTA_LIST_ELEM {
					continue
				}
				var name, data []byte
				e := attrs{b: el}
				for typ, v, ok := e.next(); ok; typ, v, ok = e.next() {
					switch typ {
					case unix.NFTA_EXPR_NAME:
						name = cstring(v)
					case unix.NFTA_EXPR_DATA:
						data = v
					}
				}
				if e.bad {
					return rule{}, 0, errors.New("malformed expression")
				}
				d.expr(name, data)
			}
			if list.bad {
				return rule{}, 0, errors.New("malformed expression list")
			}
		}
	}
	if top.bad {
		return rule{}, 0, errors.New("malformed rule attributes")
	}
	return d.r, handle, nil
}

// ruleDecoder is the state of decodeRule: the rule so far and what each
// register holds.
type ruleDecoder struct {
	r                      rule
	addrLen                int
	dstOffset, protoOffset uint32
	regs                   [unix.NFT_REG32_15 + 1]loaded
	scratch                loaded // stands for registers out of range
	rangeLow               string // the low end of a --dport range written as two cmps
}

func (d *ruleDecoder) reg(n uint32) *loaded {
	if int(n) < len(d.regs) {
		return &d.regs[n]
	}
	d.scratch = loaded{}
	return &d.scratch
}

// expr reads one expression, named name with attributes data.
func (d *ruleDecoder) expr(name, data []byte) {
	a := attrs{b: data}
	switch string(name) {
	case "meta":
		var dreg, key uint32
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_META_DREG:
				dreg = be32(v)
			case unix.NFTA_META_KEY:
				key = be32(v)
			case unix.NFTA_META_SREG:
				return // a meta set
			}
		}
		*d.reg(dreg) = loaded{meta: key, valid: true}
	case "payload":
		var l loaded
		var dreg uint32
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_PAYLOAD_DREG:
				dreg = be32(v)
			case unix.NFTA_PAYLOAD_BASE:
				l.base = be32(v)
			case unix.NFTA_PAYLOAD_OFFSET:
				l.offset = be32(v)
			case unix.NFTA_PAYLOAD_LEN:
				l.len = be32(v)
			case unix.NFTA_PAYLOAD_SREG:
				return // a payload write
			}
		}
		l.valid = true
		*d.reg(dreg) = l
	case "bitwise":
		var sreg, dreg uint32
		var mask []byte
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_BITWISE_SREG:
				sreg = be32(v)
			case unix.NFTA_BITWISE_DREG:
				dreg = be32(v)
			case unix.NFTA_BITWISE_MASK:
				mask = dataValue(v)
			}
		}
		l := *d.reg(sreg)
		l.mask = mask
		*d.reg(dreg) = l
	case "cmp":
		var sreg, op uint32
		var value []byte
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_CMP_SREG:
				sreg = be32(v)
			case unix.NFTA_CMP_OP:
				op = be32(v)
			case unix.NFTA_CMP_DATA:
				value = dataValue(v)
			}
		}
		d.cmp(d.reg(sreg), op, value)
	case "range":
		var sreg uint32
		var from, to []byte
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_RANGE_SREG:
				sreg = be32(v)
			case unix.NFTA_RANGE_FROM_DATA:
				from = dataValue(v)
			case unix.NFTA_RANGE_TO_DATA:
				to = dataValue(v)
			}
		}
		if l := d.reg(sreg); l.valid && l.meta == 0 && l.base == unix.NFT_PAYLOAD_TRANSPORT_HEADER && l.offset == dportOffset && len(from) == 2 && len(to) == 2 {
			d.r.dport = portRange(binary.BigEndian.Uint16(from), binary.BigEndian.Uint16(to))
		}
	case "match":
		var mname, info []byte
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			switch typ {
			case unix.NFTA_MATCH_NAME:
				mname = cstring(v)
			case unix.NFTA_MATCH_INFO:
				info = v
			}
		}
		decodeMatch(&d.r, mname, info)
	case "target":
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			if typ == unix.NFTA_TARGET_NAME {
				d.r.target = targetName(cstring(v))
			}
		}
	case "immediate":
		d.immediate(a)
	case "nat":
		natType := uint32(unix.NFT_NAT_SNAT) // the kernel's default
		for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
			if typ == unix.NFTA_NAT_TYPE {
				natType = be32(v)
			}
		}
		switch natType {
		case unix.NFT_NAT_DNAT:
			d.r.target = "DNAT"
		case unix.NFT_NAT_SNAT:
			d.r.target = "SNAT"
		}
	case "masq":
		d.r.target = "MASQUERADE"
	case "redir":
		d.r.target = "REDIRECT"
	}
}

// cmp reads a comparison of what register l holds with value.
func (d *ruleDecoder) cmp(l *loaded, op uint32, value []byte) {
	if !l.valid {
		return
	}
	switch {
	case l.meta == unix.NFT_META_L4PROTO && l.base == 0 && len(value) == 1,
		l.meta == 0 && l.base == unix.NFT_PAYLOAD_NETWORK_HEADER && l.offset == d.protoOffset && l.len == 1 && len(value) == 1:
		d.r.proto = protoName(value[0])
	case l.meta == 0 && l.base == unix.NFT_PAYLOAD_NETWORK_HEADER && l.offset == d.dstOffset && l.len <= uint32(d.addrLen):
		d.r.dest = addrArg(value, l.mask, d.addrLen)
	case l.meta == 0 && l.base == unix.NFT_PAYLOAD_TRANSPORT_HEADER && l.offset == 0 && l.len == 4 && len(value) == 4:
		// --sport and --dport, both single and not negated, are one load
		// of both fields.
		d.r.dport = strconv.Itoa(int(binary.BigEndian.Uint16(value[dportOffset:])))
	case l.meta == 0 && l.base == unix.NFT_PAYLOAD_TRANSPORT_HEADER && l.offset == dportOffset && l.len == 2 && len(value) == 2:
		port := strconv.Itoa(int(binary.BigEndian.Uint16(value)))
		switch op {
		case unix.NFT_CMP_GTE:
			d.rangeLow = port
		case unix.NFT_CMP_LTE:
			if d.rangeLow != "" {
				d.r.dport = d.rangeLow + ":" + port
			}
		default:
			d.r.dport = port
		}
	}
}

// immediate reads an immediate expression: a verdict when it writes the
// verdict register without a value.
func (d *ruleDecoder) immediate(a attrs) {
	var dreg uint32
	var data []byte
	for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
		switch typ {
		case unix.NFTA_IMMEDIATE_DREG:
			dreg = be32(v)
		case unix.NFTA_IMMEDIATE_DATA:
			data = v
		}
	}
	if dreg != unix.NFT_REG_VERDICT {
		return
	}
	var verdict []byte
	nd := attrs{b: data}
	for typ, v, ok := nd.next(); ok; typ, v, ok = nd.next() {
		switch typ {
		case unix.NFTA_DATA_VALUE:
			if len(v) > 0 {
				return // a value, not a verdict
			}
		case unix.NFTA_DATA_VERDICT:
			verdict = v
		}
	}
	var code int32
	var chain []byte
	vd := attrs{b: verdict}
	for typ, v, ok := vd.next(); ok; typ, v, ok = vd.next() {
		switch typ {
		case unix.NFTA_VERDICT_CODE:
			code = int32(be32(v))
		case unix.NFTA_VERDICT_CHAIN:
			chain = cstring(v)
		}
	}
	d.r.target = verdictTarget(code, chain)
}

// targetName is the -j argument of a compat target, the usual ones
// without a copy.
func targetName(name []byte) string {
	switch string(name) {
	case "DNAT":
		return "DNAT"
	case "SNAT":
		return "SNAT"
	case "MASQUERADE":
		return "MASQUERADE"
	case "MARK":
		return "MARK"
	case "REDIRECT":
		return "REDIRECT"
	case "RETURN":
		return "RETURN"
	}
	return string(name)
}

// compat match infos (linux/netfilter/xt_tcpudp.h), in host byte order:
// struct xt_tcp is spts[2], dpts[2], option, flg_mask, flg_cmp, invflags;
// struct xt_udp is spts[2], dpts[2], invflags.
const (
	xtDportsOffset   = 4
	xtTCPInvOffset   = 11
	xtUDPInvOffset   = 8
	xtInvDstPorts    = 0x02 // XT_TCP_INV_DSTPT, XT_UDP_INV_DSTPT
	xtCommentMaxSize = 256  // XT_MAX_COMMENT_LEN
)

// decodeMatch reads the compat matches the parser needs: comment, tcp,
// udp and sctp.
func decodeMatch(r *rule, name, info []byte) {
	switch string(name) {
	case "comment":
		r.comment = string(cstring(info[:min(len(info), xtCommentMaxSize)]))
	case "tcp":
		if len(info) > xtTCPInvOffset {
			if p, ok := compatPorts(xtPorts(info), info[xtTCPInvOffset]&xtInvDstPorts != 0); ok {
				r.dport = p
			}
		}
	case "udp":
		if len(info) > xtUDPInvOffset {
			if p, ok := compatPorts(xtPorts(info), info[xtUDPInvOffset]&xtInvDstPorts != 0); ok {
				r.dport = p
			}
		}
	case "sctp":
		if p, ok := sctpPorts(info); ok {
			r.dport = p
		}
	}
}

func xtPorts(info []byte) [2]uint16 {
	return [2]uint16{binary.NativeEndian.Uint16(info[xtDportsOffset:]), binary.NativeEndian.Uint16(info[xtDportsOffset+2:])}
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
	var a, m, prefix [16]byte
	copy(a[:addrLen], data)
	if mask == nil {
		for i := range min(len(data), addrLen) {
			m[i] = 0xff
		}
	} else {
		copy(m[:addrLen], mask)
	}
	ones := 0
	for _, x := range m[:addrLen] {
		ones += bits.OnesCount8(x)
	}
	for i := range ones {
		prefix[i/8] |= 0x80 >> (i % 8)
	}
	addr := addrOf(a, addrLen)
	if prefix != m {
		return addr.String() + "/" + addrOf(m, addrLen).String()
	}
	return netip.PrefixFrom(addr, ones).String()
}

func addrOf(b [16]byte, addrLen int) netip.Addr {
	if addrLen == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
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
func verdictTarget(code int32, chain []byte) string {
	switch code {
	case unix.NFT_JUMP, unix.NFT_GOTO:
		return string(chain)
	case verdictAccept:
		return "ACCEPT"
	case verdictDrop:
		return "DROP"
	case unix.NFT_RETURN:
		return "RETURN"
	case verdictQueue:
		return "QUEUE"
	}
	return ""
}
