package wire_test

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/wire"
)

// referenceJSON is a PortMapping as the reference agent sends it.
const referenceJSON = `{"remove":false,"ports":{"19090/tcp":[{"HostIp":"127.0.0.1","HostPort":"19090"}]},"connectAddrs":[{"network":"tcp","addr":"10.4.0.22:80"}]}`

func TestWireFormMatchesReference(t *testing.T) {
	c := core.Change{Mapping: core.Mapping{
		Key:          core.Key{Source: "docker", ID: "abc"},
		Ports:        []core.Port{{Protocol: core.TCP, ContainerPort: 19090, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 19090}},
		ConnectAddrs: []core.ConnectAddr{{Network: "tcp", Addr: "10.4.0.22:80"}},
	}}
	got, err := json.Marshal(wire.FromChange(c))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != referenceJSON {
		t.Errorf("wire form\n got %s\nwant %s", got, referenceJSON)
	}

	var back wire.PortMapping
	if err := json.Unmarshal([]byte(referenceJSON), &back); err != nil {
		t.Fatal(err)
	}
	ports, err := wire.ParsePorts(back.Ports)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 1 || ports[0] != c.Mapping.Ports[0] {
		t.Errorf("parsed ports %v, want %v", ports, c.Mapping.Ports)
	}
}

func TestWireFormGroupsBindingsAndKeepsNull(t *testing.T) {
	c := core.Change{Remove: true, Mapping: core.Mapping{Ports: []core.Port{
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.IPv4Unspecified(), HostPort: 8080},
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.IPv6Unspecified(), HostPort: 8080},
		{Protocol: core.UDP, ContainerPort: 53, HostPort: 5353},
	}}}
	got, err := json.Marshal(wire.FromChange(c))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"remove":true,"ports":{"53/udp":[{"HostIp":"","HostPort":"5353"}],"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"},{"HostIp":"::","HostPort":"8080"}]},"connectAddrs":null}`
	if string(got) != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

func TestParsePortsRejectsBadBindings(t *testing.T) {
	for _, in := range []string{
		`{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":""}]}`,
		`{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"70000"}]}`,
		`{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"0"}]}`,
		`{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"http"}]}`,
		`{"80/icmp":[{"HostIp":"0.0.0.0","HostPort":"80"}]}`,
	} {
		var pm wire.PortMapping
		if err := json.Unmarshal([]byte(`{"ports":`+in+`}`), &pm); err != nil {
			continue // rejected while decoding is fine too
		}
		if _, err := wire.ParsePorts(pm.Ports); err == nil {
			t.Errorf("ParsePorts(%s) accepted a bad binding", in)
		}
	}
}

// FuzzPortMapping decodes arbitrary PortMapping JSON (what a peer or a
// file may hold) and converts its ports: no panic, and accepted ports are
// valid and survive the wire form unchanged.
func FuzzPortMapping(f *testing.F) {
	f.Add([]byte(referenceJSON))
	f.Add([]byte(`{"ports":{"80/tcp":[{"HostIp":"::","HostPort":"8080"}],"53/udp":null}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var pm wire.PortMapping
		if json.Unmarshal(data, &pm) != nil {
			return
		}
		ports, err := wire.ParsePorts(pm.Ports)
		if err != nil {
			return
		}
		for _, p := range ports {
			if p.HostPort == 0 || p.ContainerPort == 0 {
				t.Fatalf("zero port accepted: %+v", p)
			}
		}
		back, err := wire.ParsePorts(wire.FromChange(core.Change{Mapping: core.Mapping{Ports: ports}}).Ports)
		if err != nil || len(back) != len(ports) {
			t.Fatalf("wire form round trip: %v, %d vs %d ports", err, len(back), len(ports))
		}
	})
}
