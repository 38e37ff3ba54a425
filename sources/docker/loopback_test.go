package docker_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/docker"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// TestLoopbackPortAnswersOnlyThroughTheTunnel sends real connections to a
// port published on 127.0.0.1, with the source's loopback NAT rules in
// place, in dockerd's namespace (the guest). The guest has a tunnel
// interface whose far end is in a namespace acting as the host side, and a
// second interface toward another namespace (a LAN). Only a connection
// that comes in through the tunnel to the guest's address reaches the
// container; one from a container on the bridge, from the LAN, to the
// bridge gateway or the guest's other address, or from the guest itself
// to those addresses, is refused, as it is without the rules.
func TestLoopbackPortAnswersOnlyThroughTheTunnel(t *testing.T) {
	d := requireEngine(t)
	n := seq.Add(1)
	const (
		guestIP = "198.18.240.2" // the guest's address toward the host
		hostIP  = "198.18.240.1"
		otherIP = "198.18.241.2" // the guest's address on the LAN
		lanIP   = "198.18.241.1"
	)
	tunnel := fmt.Sprintf("gatun%d", n)
	host, lan := testenv.Netns(t), testenv.Netns(t)
	loopbacknattest.Link(t, loopbacknattest.End{Netns: d.Netns, Iface: tunnel, Addr: guestIP + "/24"},
		loopbacknattest.End{Netns: host, Iface: "eth0", Addr: hostIP + "/24"})
	loopbacknattest.Link(t, loopbacknattest.End{Netns: d.Netns, Iface: fmt.Sprintf("galan%d", n), Addr: otherIP + "/24"},
		loopbacknattest.End{Netns: lan, Iface: "eth0", Addr: lanIP + "/24"})
	testenv.RunIn(t, host, "ip", "route", "add", "198.18.0.0/16", "via", guestIP)
	testenv.RunIn(t, lan, "ip", "route", "add", "198.18.0.0/16", "via", otherIP)

	s := newSourceNAT(t, loopbacknat.Options{Enabled: true, Iptables: wrapper, Interface: tunnel, GuestIP: guestIP})
	r := sourcetest.Start(t, docker.Name, s)

	port := 18300 + int(n)
	id := run(t, d, "-p", fmt.Sprintf("127.0.0.1:%d:80", port))
	defer func() { _, _ = d.Docker("rm", "-f", id) }()
	client := run(t, d) // a container on the same bridge network
	defer func() { _, _ = d.Docker("rm", "-f", client) }()
	waitDesired(t, r, id, func(_ core.Mapping, ok bool) bool { return ok })
	ip, err := d.Docker("inspect", "--format", "{{.NetworkSettings.Networks.bridge.IPAddress}}", id)
	if err != nil {
		t.Fatal(err)
	}
	gateway, err := d.Docker("inspect", "--format", "{{.NetworkSettings.Networks.bridge.Gateway}}", client)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := d.Docker("inspect", "--format", "{{.State.Pid}}", client)
	if err != nil {
		t.Fatal(err)
	}
	ours := fmt.Sprintf(`-A DOCKER -d %s/32 -i %s -p tcp -m tcp --dport %d -m comment --comment "%s" -j DNAT --to-destination %s:80`,
		guestIP, tunnel, port, loopbacknat.OwnerComment(docker.Name), ip)
	waitRule(t, d.Netns, ours)

	hostNS, lanNS, guestNS := loopbacknattest.NetnsPath(host), loopbacknattest.NetnsPath(lan), loopbacknattest.NetnsPath(d.Netns)
	containerNS := "/proc/" + pid + "/ns/net"
	at := func(addr string) string { return fmt.Sprintf("%s:%d", addr, port) }

	// The port is up on 127.0.0.1 (docker-proxy) and through the tunnel.
	for _, c := range []struct{ what, ns, addr string }{
		{"the guest to 127.0.0.1", guestNS, "127.0.0.1"},
		{"the host side through the tunnel to the guest address", hostNS, guestIP},
	} {
		body, err := loopbacknattest.Get(c.ns, at(c.addr))
		if err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
		if body != id[:12] {
			t.Errorf("%s: answered %q, want the container's hostname %q", c.what, body, id[:12])
		}
	}
	for _, c := range []struct{ what, ns, addr string }{
		{"a container on the bridge to the bridge gateway", containerNS, gateway},
		{"a container on the bridge to the guest address", containerNS, guestIP},
		{"the LAN to the guest's LAN address", lanNS, otherIP},
		{"the LAN to the guest address", lanNS, guestIP},
		{"the LAN to the bridge gateway", lanNS, gateway},
		{"the host side through the tunnel to the bridge gateway", hostNS, gateway},
		{"the host side through the tunnel to the guest's LAN address", hostNS, otherIP},
		{"the guest to its own tunnel address", guestNS, guestIP},
		{"the guest to the bridge gateway", guestNS, gateway},
	} {
		loopbacknattest.Refused(t, c.what, c.ns, at(c.addr))
	}

	if _, err := d.Docker("rm", "-f", id); err != nil {
		t.Fatal(err)
	}
	gone := fmt.Sprintf("--dport %d ", port) + `-m comment --comment "` + loopbacknat.OwnerComment(docker.Name)
	testenv.Eventually(t, 30*time.Second, "the rules gone after the container went", func() (bool, string) {
		rules := testenv.NatRules(t, d.Netns)
		return !strings.Contains(rules, gone), rules
	})
}

// waitRule waits until `iptables -t nat -S` in ns prints rule.
func waitRule(t *testing.T, ns, rule string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "rule "+rule+" in place", func() (bool, string) {
		rules := testenv.NatRules(t, ns)
		return strings.Contains(rules, rule+"\n"), rules
	})
}

// TestLoopbackPortSurvivesADockerdRestart: a container published on
// 127.0.0.1 that outlives a dockerd restart (live restore; and one with a
// restart policy, which a restarted dockerd starts again) answers through
// the tunnel and through a second entry (wsl-proxy's upstream) before and
// after the restart. A restarted dockerd deletes and
// appends its own PREROUTING jump to DOCKER again, behind whatever rules
// were there, and flushes DOCKER, so rules that only work in front of the
// engine's, or that the restart removed, cut the port off.
func TestLoopbackPortSurvivesADockerdRestart(t *testing.T) {
	d := requireEngine(t)
	n := seq.Add(1)
	const (
		guestIP    = "198.18.242.2"
		hostIP     = "198.18.242.1"
		upstreamIP = "198.18.245.1" // the guest's end of a second entry (wsl-proxy's upstream)
		defaultIP  = "198.18.245.2" // where that entry's peer connects from
	)
	tunnel, upstream := fmt.Sprintf("gatun%d", n), fmt.Sprintf("gaup%d", n)
	host, other := testenv.Netns(t), testenv.Netns(t)
	loopbacknattest.Link(t, loopbacknattest.End{Netns: d.Netns, Iface: tunnel, Addr: guestIP + "/24"},
		loopbacknattest.End{Netns: host, Iface: "eth0", Addr: hostIP + "/24"})
	loopbacknattest.Link(t, loopbacknattest.End{Netns: d.Netns, Iface: upstream, Addr: upstreamIP + "/24"},
		loopbacknattest.End{Netns: other, Iface: "eth0", Addr: defaultIP + "/24"})
	testenv.RunIn(t, host, "ip", "route", "add", "198.18.0.0/16", "via", guestIP)
	testenv.RunIn(t, other, "ip", "route", "add", "198.18.0.0/16", "via", upstreamIP)

	s, err := docker.New(docker.Config{Host: d.Host,
		LoopbackNAT: loopbacknat.Options{Enabled: true, Iptables: wrapper, Interface: tunnel, GuestIP: guestIP},
		Entries:     []registry.Entry{{Interface: upstream, Addr: netip.MustParseAddr(upstreamIP)}},
		Backoff:     core.Backoff{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, docker.Name, s)
	live, always := 18400+int(n), 18500+int(n)
	liveID := run(t, d, "-p", fmt.Sprintf("127.0.0.1:%d:80", live))
	defer func() { _, _ = d.Docker("rm", "-f", liveID) }()
	alwaysID := run(t, d, "--restart=always", "-p", fmt.Sprintf("127.0.0.1:%d:80", always))
	defer func() { _, _ = d.Docker("rm", "-f", alwaysID) }()
	answers := func(when string) {
		t.Helper()
		for _, c := range []struct {
			id   string
			port int
		}{{liveID, live}, {alwaysID, always}} {
			for _, path := range []struct{ what, from, to string }{
				{"through the tunnel", host, guestIP},
				{"through the second entry", other, upstreamIP},
			} {
				addr := fmt.Sprintf("%s:%d", path.to, c.port)
				var body string
				testenv.Eventually(t, 30*time.Second, when+": "+addr+" "+path.what, func() (bool, string) {
					var err error
					body, err = loopbacknattest.Get(loopbacknattest.NetnsPath(path.from), addr)
					if err != nil {
						return false, err.Error()
					}
					return true, ""
				})
				if body != c.id[:12] {
					t.Errorf("%s: %s answered %q %s, want the container's hostname %q", when, addr, body, path.what, c.id[:12])
				}
			}
		}
	}
	waitDesired(t, r, liveID, func(_ core.Mapping, ok bool) bool { return ok })
	waitDesired(t, r, alwaysID, func(_ core.Mapping, ok bool) bool { return ok })
	answers("before the restart")

	d.Stop()
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("nat rules after the restart:\n%s", testenv.NatRules(t, d.Netns))
		}
	}()
	answers("after the restart")
}
