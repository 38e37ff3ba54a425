package core_test

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/guestagent/guestagent/core"
)

// FuzzPortMapping decodes arbitrary PortMapping JSON (what a peer or a
// file may hold) and converts its ports: no panic, and accepted ports are
// valid and survive the wire form unchanged.
func FuzzPortMapping(f *testing.F) {
	f.Add([]byte(referenceJSON))
	f.Add([]byte(`{"ports":{"80/tcp":[{"HostIp":"::","HostPort":"8080"}],"53/udp":null}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var pm core.PortMapping
		if json.Unmarshal(data, &pm) != nil {
			return
		}
		ports, err := core.ParsePorts(pm.Ports)
		if err != nil {
			return
		}
		for _, p := range ports {
			if p.HostPort == 0 || p.ContainerPort == 0 {
				t.Fatalf("zero port accepted: %+v", p)
			}
		}
		back, err := core.ParsePorts(core.Change{Mapping: core.Mapping{Ports: ports}}.WireForm().Ports)
		if err != nil || len(back) != len(ports) {
			t.Fatalf("wire form round trip: %v, %d vs %d ports", err, len(back), len(ports))
		}
	})
}

// FuzzLoopbackOnly is the non-admin property: whatever port goes in, the
// policy never lets through a non-loopback address or a privileged port.
func FuzzLoopbackOnly(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0}, uint16(80))
	f.Add([]byte{127, 0, 0, 1}, uint16(8080))
	f.Add(make([]byte, 16), uint16(1024))
	f.Fuzz(func(t *testing.T, ip []byte, hostPort uint16) {
		addr, _ := netip.AddrFromSlice(ip)
		p, err := core.LoopbackOnly(core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: addr, HostPort: hostPort})
		if err != nil {
			if hostPort >= core.PrivilegedPortLimit {
				t.Fatalf("refused unprivileged port %d: %v", hostPort, err)
			}
			return
		}
		if p.HostPort < core.PrivilegedPortLimit || !p.HostIP.IsLoopback() {
			t.Fatalf("let through %v", p)
		}
	})
}
