package sockets

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
)

// Socket is one socket as sock_diag reports it.
type Socket struct {
	// Protocol is tcp or udp.
	Protocol core.Protocol
	// Family is unix.AF_INET or unix.AF_INET6.
	Family uint8
	// State is the kernel's TCP state number (10 LISTEN for a listening
	// TCP socket, 7 CLOSE for an unconnected UDP socket).
	State uint8
	// Addr and Port are the local address and port; Addr is 16 bytes for
	// AF_INET6 sockets, including IPv4-mapped ones.
	Addr netip.Addr
	Port uint16
	// Interface is the device the socket is bound to, 0 for none.
	Interface uint32
	// V6Only is the socket's IPV6_V6ONLY option (INET_DIAG_SKV6ONLY);
	// always false for AF_INET sockets.
	V6Only bool
	// UID owns the socket; Inode is its inode number, which the socket's
	// descriptors in /proc/<pid>/fd name as "socket:[Inode]".
	UID, Inode uint32
	// Cookie is the kernel's socket cookie (idiag_cookie), the number
	// eBPF programs know the socket by.
	Cookie uint64
}

// Kernel TCP states (include/net/tcp_states.h).
const (
	stateClose  = 7
	stateListen = 10
)

// Sizes and attribute numbers of linux/inet_diag.h and linux/sock_diag.h.
const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY
	sizeofReq        = 56 // struct inet_diag_req_v2
	sizeofMsg        = 72 // struct inet_diag_msg
	attrV6Only       = 11 // INET_DIAG_SKV6ONLY
)

// request returns a struct inet_diag_req_v2 that dumps the sockets of
// family and protocol in the given states: LISTEN for TCP, CLOSE (bound,
// not connected) for UDP. No extensions are asked for; the kernel adds
// INET_DIAG_SKV6ONLY to every AF_INET6 socket in those states by itself.
func request(family, protocol uint8, states uint32) []byte {
	b := make([]byte, sizeofReq)
	b[0], b[1] = family, protocol
	binary.NativeEndian.PutUint32(b[4:8], states)
	return b
}

// Decode decodes one struct inet_diag_msg and its attributes, as the
// payload of one netlink message of a sock_diag dump of protocol. A
// message that is too short, has an unknown family or malformed
// attributes is an error.
func Decode(protocol core.Protocol, b []byte) (Socket, error) {
	if len(b) < sizeofMsg {
		return Socket{}, fmt.Errorf("inet_diag_msg of %d bytes, want at least %d", len(b), sizeofMsg)
	}
	s := Socket{Protocol: protocol, Family: b[0], State: b[1]}
	s.Port = binary.BigEndian.Uint16(b[4:6])
	switch s.Family {
	case unix.AF_INET:
		s.Addr = netip.AddrFrom4([4]byte(b[8:12]))
	case unix.AF_INET6:
		s.Addr = netip.AddrFrom16([16]byte(b[8:24]))
	default:
		return Socket{}, fmt.Errorf("inet_diag_msg of unknown family %d", s.Family)
	}
	s.Interface = binary.NativeEndian.Uint32(b[40:44])
	s.Cookie = uint64(binary.NativeEndian.Uint32(b[44:48])) | uint64(binary.NativeEndian.Uint32(b[48:52]))<<32
	s.UID = binary.NativeEndian.Uint32(b[64:68])
	s.Inode = binary.NativeEndian.Uint32(b[68:72])
	if len(b) == sizeofMsg {
		return s, nil
	}
	ad, err := netlink.NewAttributeDecoder(b[sizeofMsg:])
	if err != nil {
		return Socket{}, fmt.Errorf("inet_diag_msg attributes: %w", err)
	}
	for ad.Next() {
		if v := ad.Bytes(); ad.Type() == attrV6Only && len(v) >= 1 {
			s.V6Only = v[0] != 0
		}
	}
	if err := ad.Err(); err != nil {
		return Socket{}, fmt.Errorf("inet_diag_msg attributes: %w", err)
	}
	return s, nil
}

// dumper reads sockets over one NETLINK_SOCK_DIAG connection, opened in
// the network namespace at netns (the agent's own when empty) and opened
// again after a failure.
type dumper struct {
	netns string
	conn  *netlink.Conn
}

// dumpQuery is one of the four dumps a scan makes.
type dumpQuery struct {
	protocol core.Protocol
	family   uint8
	ipproto  uint8
	states   uint32
}

var dumpQueries = []dumpQuery{
	{core.TCP, unix.AF_INET, unix.IPPROTO_TCP, 1 << stateListen},
	{core.TCP, unix.AF_INET6, unix.IPPROTO_TCP, 1 << stateListen},
	{core.UDP, unix.AF_INET, unix.IPPROTO_UDP, 1 << stateClose},
	{core.UDP, unix.AF_INET6, unix.IPPROTO_UDP, 1 << stateClose},
}

// maxDumpTries bounds the repeats of a dump the kernel marks as
// interrupted (the socket table changed while it was read).
const maxDumpTries = 3

// dump returns the listening TCP and bound UDP sockets, IPv4 and IPv6.
// Messages that do not decode are counted in bad and left out.
func (d *dumper) dump() (socks []Socket, bad int, err error) {
	if d.conn == nil {
		if d.conn, err = dial(d.netns); err != nil {
			return nil, 0, err
		}
	}
	for _, q := range dumpQueries {
		var msgs []netlink.Message
		for try := 1; ; try++ {
			msgs, err = d.conn.Execute(netlink.Message{
				Header: netlink.Header{Type: sockDiagByFamily, Flags: netlink.Request | netlink.Dump},
				Data:   request(q.family, q.ipproto, q.states),
			})
			if err != nil {
				d.close()
				return nil, 0, fmt.Errorf("sock_diag dump of %s (family %d): %w", q.protocol, q.family, err)
			}
			if !interrupted(msgs) || try == maxDumpTries {
				break
			}
		}
		for _, m := range msgs {
			s, err := Decode(q.protocol, m.Data)
			if err != nil {
				bad++
				continue
			}
			socks = append(socks, s)
		}
	}
	return socks, bad, nil
}

func interrupted(msgs []netlink.Message) bool {
	for _, m := range msgs {
		if m.Header.Flags&netlink.DumpInterrupted != 0 {
			return true
		}
	}
	return false
}

func (d *dumper) close() {
	if d.conn != nil {
		_ = d.conn.Close()
		d.conn = nil
	}
}

// dial opens a NETLINK_SOCK_DIAG socket in the namespace at netns; the
// socket stays in it once the namespace file is closed.
func dial(netns string) (*netlink.Conn, error) {
	cfg := &netlink.Config{}
	if netns != "" {
		f, err := os.Open(netns)
		if err != nil {
			return nil, fmt.Errorf("opening network namespace: %w", err)
		}
		defer f.Close()
		cfg.NetNS = int(f.Fd())
	}
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, cfg)
	if err != nil {
		return nil, fmt.Errorf("opening a sock_diag socket: %w", err)
	}
	return c, nil
}
