package sockets

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// routeMsg builds one route netlink message of type typ: its fixed part
// (fixed bytes, zero) and one attribute.
func routeMsg(typ uint16, fixed int, attr uint16, value []byte) []byte {
	align := func(n int) int { return (n + 3) &^ 3 }
	alen := unix.SizeofRtAttr + len(value)
	b := make([]byte, unix.SizeofNlMsghdr+fixed+align(alen))
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], typ)
	at := b[unix.SizeofNlMsghdr+fixed:]
	binary.NativeEndian.PutUint16(at[0:], uint16(alen))
	binary.NativeEndian.PutUint16(at[2:], attr)
	copy(at[unix.SizeofRtAttr:], value)
	return b
}

// TestLinkChangesOfTheEntriesAloneWakeTheRelays: a change of an entry's
// interface or of an address an entry listens on is passed on; one of
// another link (a container's veth) or address is not, and neither is a
// change of a name that only starts with the entry's.
func TestLinkChangesOfTheEntriesAloneWakeTheRelays(t *testing.T) {
	entries := []relayEntry{
		{addr: netip.MustParseAddr("192.168.127.2"), iface: "eth0"},
		{addr: netip.MustParseAddr("192.168.143.1"), iface: "veth-rd-ns"},
	}
	link := func(typ uint16, name string) []byte {
		return routeMsg(typ, unix.SizeofIfInfomsg, unix.IFLA_IFNAME, append([]byte(name), 0))
	}
	addr := func(typ uint16, a string) []byte {
		return routeMsg(typ, unix.SizeofIfAddrmsg, unix.IFA_LOCAL, netip.MustParseAddr(a).AsSlice())
	}
	for _, c := range []struct {
		what string
		msg  []byte
		want bool
	}{
		{"the tunnel's interface made again", link(unix.RTM_NEWLINK, "eth0"), true},
		{"an entry's interface gone", link(unix.RTM_DELLINK, "veth-rd-ns"), true},
		{"the tunnel's address back", addr(unix.RTM_NEWADDR, "192.168.127.2"), true},
		{"an entry's address gone", addr(unix.RTM_DELADDR, "192.168.143.1"), true},
		{"a container's veth", link(unix.RTM_NEWLINK, "veth1a2b3c"), false},
		{"a name that starts as the tunnel's", link(unix.RTM_NEWLINK, "eth01"), false},
		{"a bridge's address", addr(unix.RTM_NEWADDR, "172.17.0.1"), false},
		{"a link-local IPv6 address", addr(unix.RTM_NEWADDR, "fe80::1"), false},
		{"one of two in a batch", append(link(unix.RTM_NEWLINK, "veth9"), addr(unix.RTM_NEWADDR, "192.168.127.2")...), true},
		{"not a netlink message", []byte{1, 2, 3}, true},
	} {
		if got := concernsEntries(entries, c.msg); got != c.want {
			t.Errorf("%s: %t, want %t", c.what, got, c.want)
		}
	}
}
