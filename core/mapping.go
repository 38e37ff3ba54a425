package core

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Protocol is a transport protocol of a published port.
type Protocol string

// Protocols a port can use.
const (
	TCP  Protocol = "tcp"
	UDP  Protocol = "udp"
	SCTP Protocol = "sctp"
)

// ParseProtocol normalises s ("TCP", "udp", ...) to a Protocol; an empty
// string means TCP, as in Docker's port specs.
func ParseProtocol(s string) (Protocol, error) {
	switch p := Protocol(strings.ToLower(strings.TrimSpace(s))); p {
	case "":
		return TCP, nil
	case TCP, UDP, SCTP:
		return p, nil
	default:
		return "", fmt.Errorf("unknown protocol %q (want tcp, udp or sctp)", s)
	}
}

// Port is one published port: traffic to HostIP:HostPort on the host reaches
// ContainerPort of the workload. A zero HostIP means all addresses.
type Port struct {
	Protocol      Protocol   `json:"protocol"`
	ContainerPort uint16     `json:"containerPort"`
	HostIP        netip.Addr `json:"hostIP"`
	HostPort      uint16     `json:"hostPort"`
}

// Validate reports whether p can be exposed.
func (p Port) Validate() error {
	switch p.Protocol {
	case TCP, UDP, SCTP:
	default:
		return fmt.Errorf("port %s: unknown protocol %q", p, p.Protocol)
	}
	if p.ContainerPort == 0 {
		return fmt.Errorf("port %s: container port must be 1-65535", p)
	}
	if p.HostPort == 0 {
		return fmt.Errorf("port %s: host port must be 1-65535", p)
	}
	if p.HostIP.Zone() != "" {
		return fmt.Errorf("port %s: host IP must not carry a zone", p)
	}
	return nil
}

// String renders p as "hostIP:hostPort->containerPort/proto".
func (p Port) String() string {
	host := netip.IPv4Unspecified()
	if p.HostIP.IsValid() {
		host = p.HostIP
	}
	return fmt.Sprintf("%s->%d/%s", netip.AddrPortFrom(host, p.HostPort), p.ContainerPort, p.Protocol)
}

// ComparePorts orders ports by protocol, host port, host IP and container port.
func ComparePorts(a, b Port) int {
	if c := strings.Compare(string(a.Protocol), string(b.Protocol)); c != 0 {
		return c
	}
	if a.HostPort != b.HostPort {
		return int(a.HostPort) - int(b.HostPort)
	}
	if c := a.HostIP.Compare(b.HostIP); c != 0 {
		return c
	}
	return int(a.ContainerPort) - int(b.ContainerPort)
}

// ConnectAddr is a backend address a sink may connect to for a mapping.
type ConnectAddr struct {
	Network string `json:"network"`
	Addr    string `json:"addr"`
}

// Key identifies a mapping: the source that reported it and an ID that is
// stable within that source (a container ID, a service UID, ...).
type Key struct {
	Source string `json:"source"`
	ID     string `json:"id"`
}

// String renders k as "source/id".
func (k Key) String() string { return k.Source + "/" + k.ID }

// Mapping is the set of ports one workload should have exposed.
type Mapping struct {
	Key
	Ports        []Port        `json:"ports"`
	ConnectAddrs []ConnectAddr `json:"connectAddrs,omitempty"`
}

// Normalize returns m with its ports sorted and duplicates dropped, so that
// equal mappings compare equal.
func (m Mapping) Normalize() Mapping {
	out := m
	out.Ports = slices.Clone(m.Ports)
	slices.SortFunc(out.Ports, ComparePorts)
	out.Ports = slices.Compact(out.Ports)
	out.ConnectAddrs = slices.Clone(m.ConnectAddrs)
	return out
}

// Validate checks that m has an ID and only valid ports.
func (m Mapping) Validate() error {
	if m.ID == "" {
		return errors.New("mapping has no id")
	}
	var errs []error
	for _, p := range m.Ports {
		if err := p.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("mapping %s: %w", m.Key, err)
	}
	return nil
}

// Equal reports whether m and o expose the same ports to the same backends.
// Both must be normalized.
func (m Mapping) Equal(o Mapping) bool {
	return m.Key == o.Key && slices.Equal(m.Ports, o.Ports) && slices.Equal(m.ConnectAddrs, o.ConnectAddrs)
}

// Change is one delivery to a sink: Ports of Mapping are to be added or,
// when Remove is set, removed.
type Change struct {
	Remove  bool
	Mapping Mapping
}

// String renders c for logs.
func (c Change) String() string {
	op := "add"
	if c.Remove {
		op = "remove"
	}
	parts := make([]string, len(c.Mapping.Ports))
	for i, p := range c.Mapping.Ports {
		parts[i] = p.String()
	}
	return fmt.Sprintf("%s %s [%s]", op, c.Mapping.Key, strings.Join(parts, " "))
}
