// Package wire is the JSON form in which wsl-proxy and the vtunnel peer
// take port mappings: the Docker API's port map, keyed by "<port>/<proto>",
// with the addresses the host connects to. The docker source reads the same
// port map from container inspections.
package wire

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/moby/api/types/network"

	"github.com/guestagent/guestagent/core"
)

// PortMapping is one change as wsl-proxy and the vtunnel peer expect it.
type PortMapping struct {
	Remove       bool               `json:"remove"`
	Ports        network.PortMap    `json:"ports"`
	ConnectAddrs []core.ConnectAddr `json:"connectAddrs"`
}

// FromChange converts c to its wire form.
func FromChange(c core.Change) PortMapping {
	pm := PortMapping{
		Remove:       c.Remove,
		Ports:        network.PortMap{},
		ConnectAddrs: c.Mapping.ConnectAddrs,
	}
	for _, p := range c.Mapping.Ports {
		key, ok := network.PortFrom(p.ContainerPort, network.IPProtocol(p.Protocol))
		if !ok {
			continue // Validate rejects ports without a protocol before they get here.
		}
		pm.Ports[key] = append(pm.Ports[key], network.PortBinding{
			HostIP:   p.HostIP,
			HostPort: strconv.Itoa(int(p.HostPort)),
		})
	}
	return pm
}

// ParsePorts converts a Docker port map into ports, expanding nothing and
// rejecting bindings whose host port is missing or out of range. Bindings
// with an empty host port (published to a random port that is not yet
// known) are reported as errors too, so callers can log them.
func ParsePorts(pm network.PortMap) ([]core.Port, error) {
	keys := make([]network.Port, 0, len(pm))
	for k := range pm {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b network.Port) int {
		if a.Num() != b.Num() {
			return int(a.Num()) - int(b.Num())
		}
		return strings.Compare(string(a.Proto()), string(b.Proto()))
	})
	var ports []core.Port
	for _, k := range keys {
		proto, err := core.ParseProtocol(string(k.Proto()))
		if err != nil {
			return nil, fmt.Errorf("port %s: %w", k, err)
		}
		if k.Num() == 0 {
			return nil, fmt.Errorf("port %s: container port must be 1-65535", k)
		}
		for _, b := range pm[k] {
			hp, err := strconv.ParseUint(b.HostPort, 10, 16)
			if err != nil || hp == 0 {
				return nil, fmt.Errorf("port %s: host port %q is not 1-65535", k, b.HostPort)
			}
			ports = append(ports, core.Port{Protocol: proto, ContainerPort: k.Num(), HostIP: b.HostIP, HostPort: uint16(hp)})
		}
	}
	return ports, nil
}
