package core

import (
	"fmt"
	"net/netip"
)

// Policy adjusts one port before it is delivered to sinks, or refuses it
// with an error saying why. The Router logs refused ports and shows them in
// its status; they are never silently dropped.
type Policy func(Port) (Port, error)

// PrivilegedPortLimit is the first port number an unprivileged user may bind
// on the host.
const PrivilegedPortLimit = 1024

// LoopbackOnly is the policy of the non-admin networking mode: every binding
// moves to the loopback address of its family and privileged host ports
// (below 1024) are refused, since the host side cannot bind them.
func LoopbackOnly(p Port) (Port, error) {
	if p.HostPort < PrivilegedPortLimit {
		return p, fmt.Errorf("host port %d is privileged (< %d) and not used in non-admin mode", p.HostPort, PrivilegedPortLimit)
	}
	if p.HostIP.Is6() && !p.HostIP.Is4In6() {
		p.HostIP = netip.IPv6Loopback()
	} else {
		p.HostIP = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return p, nil
}
