package iptables

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// This file turns what decodeRule reads (compat matches and targets,
// ports, addresses, protocol numbers, verdicts) into the arguments
// `iptables -S` prints for them, so that rules read over netlink parse as
// the legacy back-end's lines do.

// compatTargets are the usual compat targets, whose names targetName
// returns without a copy.
var compatTargets = []string{"DNAT", "SNAT", "MASQUERADE", "MARK", "REDIRECT", "RETURN"}

// targetName is the -j argument of a compat target.
func targetName(name []byte) string {
	for _, t := range compatTargets {
		if string(name) == t {
			return t
		}
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
	case "tcp", "udp":
		inv := xtTCPInvOffset
		if string(name) == "udp" {
			inv = xtUDPInvOffset
		}
		if len(info) > inv {
			if p, ok := compatPorts(xtPorts(info), info[inv]&xtInvDstPorts != 0); ok {
				r.dport = p
			}
		}
	case "sctp":
		if p, ok := sctpPorts(info); ok {
			r.dport = p
		}
	}
}

// xtPorts is the destination port range of a tcp or udp match info.
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

// sctpPorts is what the sctp match prints for its destination ports, if
// it matches them.
func sctpPorts(info []byte) (string, bool) {
	if len(info) < sctpFlagsOffset+4 {
		return "", false
	}
	if binary.NativeEndian.Uint32(info[sctpFlagsOffset:])&sctpDestPorts == 0 {
		return "", false
	}
	return portRange(binary.NativeEndian.Uint16(info[0:]), binary.NativeEndian.Uint16(info[2:])), true
}

// portRange prints a port range as iptables does: one port, or lo:hi.
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

// addrOf is the address in the first addrLen bytes of b.
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

// Verdict codes (linux/netfilter.h and nf_tables.h).
const (
	verdictDrop   = 0
	verdictAccept = 1
	verdictQueue  = 3
)

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
