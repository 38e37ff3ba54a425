package iptables

import (
	"bytes"
	"encoding/binary"
	"errors"
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

// familyName is the nftables name of a family, ip or ip6.
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

// cstring is a NUL-terminated string attribute, as bytes: what comes
// before its first NUL, as C reads it.
func cstring(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}

// attrSetSize bounds the attribute types an attrSet keeps: every
// attribute the decoder reads has a smaller one.
const attrSetSize = 16

// attrSet is the attributes of one message or nested attribute, by type:
// the payload of the last of each type, and which types are present.
type attrSet struct {
	v    [attrSetSize][]byte
	seen uint16
}

// read reads the attributes of b, without copying, and tells whether
// they are well formed; those before a malformed one are kept.
func (s *attrSet) read(b []byte) bool {
	a := attrs{b: b}
	for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
		if typ < attrSetSize {
			s.v[typ] = v
			s.seen |= 1 << typ
		}
	}
	return !a.bad
}

// has tells whether an attribute of type typ is present.
func (s *attrSet) has(typ uint16) bool { return typ < attrSetSize && s.seen&(1<<typ) != 0 }

// get is the payload of typ, nil when absent.
func (s *attrSet) get(typ uint16) []byte {
	if typ >= attrSetSize {
		return nil
	}
	return s.v[typ]
}

// u32 is typ as a big-endian 32-bit value, 0 when absent.
func (s *attrSet) u32(typ uint16) uint32 { return be32(s.get(typ)) }

// data is the NFTA_DATA_VALUE nested in typ, nil when absent.
func (s *attrSet) data(typ uint16) []byte { return dataValue(s.get(typ)) }

// str is typ as a NUL-terminated string, nil when absent.
func (s *attrSet) str(typ uint16) []byte { return cstring(s.get(typ)) }

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

// header tells whether l is a load from offset in the base header
// (NFT_PAYLOAD_NETWORK_HEADER or NFT_PAYLOAD_TRANSPORT_HEADER).
func (l *loaded) header(base, offset uint32) bool {
	return l.valid && l.meta == 0 && l.base == base && l.offset == offset
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
				var e attrSet
				if !e.read(el) {
					return rule{}, 0, errors.New("malformed expression")
				}
				d.expr(e.str(unix.NFTA_EXPR_NAME), e.get(unix.NFTA_EXPR_DATA))
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

// reg is register n, or a scratch register when n is out of range.
func (d *ruleDecoder) reg(n uint32) *loaded {
	if int(n) < len(d.regs) {
		return &d.regs[n]
	}
	d.scratch = loaded{}
	return &d.scratch
}

// expr reads one expression, named name with attributes data.
func (d *ruleDecoder) expr(name, data []byte) {
	var a attrSet
	a.read(data)
	switch string(name) {
	case "meta":
		if a.has(unix.NFTA_META_SREG) {
			return // a meta set
		}
		*d.reg(a.u32(unix.NFTA_META_DREG)) = loaded{meta: a.u32(unix.NFTA_META_KEY), valid: true}
	case "payload":
		if a.has(unix.NFTA_PAYLOAD_SREG) {
			return // a payload write
		}
		*d.reg(a.u32(unix.NFTA_PAYLOAD_DREG)) = loaded{
			base:   a.u32(unix.NFTA_PAYLOAD_BASE),
			offset: a.u32(unix.NFTA_PAYLOAD_OFFSET),
			len:    a.u32(unix.NFTA_PAYLOAD_LEN),
			valid:  true,
		}
	case "bitwise":
		l := *d.reg(a.u32(unix.NFTA_BITWISE_SREG))
		l.mask = a.data(unix.NFTA_BITWISE_MASK)
		*d.reg(a.u32(unix.NFTA_BITWISE_DREG)) = l
	case "cmp":
		d.cmp(d.reg(a.u32(unix.NFTA_CMP_SREG)), a.u32(unix.NFTA_CMP_OP), a.data(unix.NFTA_CMP_DATA))
	case "range":
		from, to := a.data(unix.NFTA_RANGE_FROM_DATA), a.data(unix.NFTA_RANGE_TO_DATA)
		if l := d.reg(a.u32(unix.NFTA_RANGE_SREG)); l.header(unix.NFT_PAYLOAD_TRANSPORT_HEADER, dportOffset) && len(from) == 2 && len(to) == 2 {
			d.r.dport = portRange(binary.BigEndian.Uint16(from), binary.BigEndian.Uint16(to))
		}
	case "match":
		decodeMatch(&d.r, a.str(unix.NFTA_MATCH_NAME), a.get(unix.NFTA_MATCH_INFO))
	case "target":
		if a.has(unix.NFTA_TARGET_NAME) {
			d.r.target = targetName(a.str(unix.NFTA_TARGET_NAME))
		}
	case "immediate":
		d.immediate(&a)
	case "nat":
		natType := uint32(unix.NFT_NAT_SNAT) // the kernel's default
		if a.has(unix.NFTA_NAT_TYPE) {
			natType = a.u32(unix.NFTA_NAT_TYPE)
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
		l.header(unix.NFT_PAYLOAD_NETWORK_HEADER, d.protoOffset) && l.len == 1 && len(value) == 1:
		d.r.proto = protoName(value[0])
	case l.header(unix.NFT_PAYLOAD_NETWORK_HEADER, d.dstOffset) && l.len <= uint32(d.addrLen):
		d.r.dest = addrArg(value, l.mask, d.addrLen)
	case l.header(unix.NFT_PAYLOAD_TRANSPORT_HEADER, 0) && l.len == 4 && len(value) == 4:
		// --sport and --dport, both single and not negated, are one load
		// of both fields.
		d.r.dport = strconv.Itoa(int(binary.BigEndian.Uint16(value[dportOffset:])))
	case l.header(unix.NFT_PAYLOAD_TRANSPORT_HEADER, dportOffset) && l.len == 2 && len(value) == 2:
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

// immediate reads an immediate expression, its attributes a: a verdict
// when it writes the verdict register without a value.
func (d *ruleDecoder) immediate(a *attrSet) {
	if a.u32(unix.NFTA_IMMEDIATE_DREG) != unix.NFT_REG_VERDICT {
		return
	}
	var data, verdict attrSet
	data.read(a.get(unix.NFTA_IMMEDIATE_DATA))
	if len(data.get(unix.NFTA_DATA_VALUE)) > 0 {
		return // a value, not a verdict
	}
	verdict.read(data.get(unix.NFTA_DATA_VERDICT))
	d.r.target = verdictTarget(int32(verdict.u32(unix.NFTA_VERDICT_CODE)), verdict.str(unix.NFTA_VERDICT_CHAIN))
}
