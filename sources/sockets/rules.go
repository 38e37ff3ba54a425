package sockets

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/guestagent/guestagent/core"
	"golang.org/x/sys/unix"
)

// DefaultExclude are the ports never reported unless Config.Exclude says
// otherwise: services of the machine itself rather than a user's.
//
//   - 22: SSH;
//   - 53, 67-68, 546-547, 123, 323, 5353: DNS, DHCP and DHCPv6 clients and
//     servers, NTP and chrony's command port, mDNS;
//   - 2379-2381: etcd (client, peer, metrics);
//   - 6443, 6444: the Kubernetes API server and k3s's supervisor;
//   - 10010: k3s's containerd stream server;
//   - 10248-10259: kubelet, kube-proxy, the scheduler and the controller
//     manager;
//   - 4789, 8472, 51820-51821: the kernel's VXLAN (flannel) and WireGuard
//     sockets, which no process holds.
var DefaultExclude = []string{
	"22", "53", "67-68", "123", "323", "546-547", "5353",
	"2379-2381", "6443-6444", "10010", "10248-10259",
	"4789", "8472", "51820-51821",
}

// PortRange is an inclusive range of port numbers.
type PortRange struct{ First, Last uint16 }

// Contains reports whether port is in r.
func (r PortRange) Contains(port uint16) bool { return r.First <= port && port <= r.Last }

// ParsePortRanges parses port numbers and ranges such as "22", "10250-10259"
// or "22,6443" (each element may hold several, comma-separated).
func ParsePortRanges(specs []string) ([]PortRange, error) {
	var out []PortRange
	for _, spec := range specs {
		for part := range strings.SplitSeq(spec, ",") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			first, last, isRange := strings.Cut(part, "-")
			a, err := parsePort(first)
			if err != nil {
				return nil, fmt.Errorf("port range %q: %w", part, err)
			}
			b := a
			if isRange {
				if b, err = parsePort(last); err != nil {
					return nil, fmt.Errorf("port range %q: %w", part, err)
				}
				if b < a {
					return nil, fmt.Errorf("port range %q ends before it starts", part)
				}
			}
			out = append(out, PortRange{a, b})
		}
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port number 1-65535", s)
	}
	return uint16(n), nil
}

// excluded reports whether port is in one of rs.
func excluded(rs []PortRange, port uint16) bool {
	for _, r := range rs {
		if r.Contains(port) {
			return true
		}
	}
	return false
}

// Listening reports whether s is a listening TCP socket or a bound UDP
// socket with a local port: what the source reports.
func Listening(s Socket) bool {
	if s.Port == 0 {
		return false
	}
	switch s.Protocol {
	case core.TCP:
		return s.State == stateListen
	case core.UDP:
		return s.State == stateClose
	}
	return false
}

// HostAddr is the address a socket is reported on:
//
//   - 0.0.0.0 for an IPv4 wildcard socket and for an IPv6 wildcard socket
//     without IPV6_V6ONLY (dual-stack, it takes IPv4 too);
//   - :: for an IPv6 wildcard socket with IPV6_V6ONLY;
//   - an IPv4-mapped IPv6 address as the IPv4 address (::ffff:127.0.0.1 is
//     127.0.0.1);
//   - any other address as itself, 127.0.0.1 and ::1 included.
//
// Link-local and multicast addresses cannot be reached from the host as
// they are, and are not reported (ok is false).
func HostAddr(s Socket) (addr netip.Addr, ok bool) {
	a := s.Addr
	if s.Family == unix.AF_INET6 && a.IsUnspecified() {
		if s.V6Only {
			return netip.IPv6Unspecified(), true
		}
		return netip.IPv4Unspecified(), true
	}
	a = a.Unmap()
	if !a.IsValid() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsLinkLocalMulticast() {
		return netip.Addr{}, false
	}
	return a, true
}

// Identity is what a socket is reported as: one port, with the same
// container and host port.
func Identity(s Socket) (core.Port, bool) {
	if !Listening(s) {
		return core.Port{}, false
	}
	addr, ok := HostAddr(s)
	if !ok {
		return core.Port{}, false
	}
	return core.Port{Protocol: s.Protocol, ContainerPort: s.Port, HostIP: addr, HostPort: s.Port}, true
}

// ID is the mapping id of p, stable for as long as a socket with the same
// protocol, reported address and port exists: "tcp/0.0.0.0:8000",
// "udp/[::1]:5353".
func ID(p core.Port) string {
	return string(p.Protocol) + "/" + netip.AddrPortFrom(p.HostIP, p.HostPort).String()
}
