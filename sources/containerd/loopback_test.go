package containerd_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	cniutils "github.com/containernetworking/plugins/pkg/utils"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/containerd"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// TestLoopbackPortAnswersOnlyThroughTheTunnel runs a container on a CNI
// bridge network made by the real bridge and portmap plugins, as nerdctl
// does for -p 127.0.0.1:P:80, in a namespace acting as the guest, and sends
// real connections to P once the source's loopback NAT rules are in the
// container's CNI-DN chain. The guest has a tunnel interface toward a
// namespace acting as the host side, and one toward another namespace (a
// LAN). Only a connection that comes in through the tunnel to the guest's
// address reaches the container. Portmap sends everything to a local
// address with the port into the CNI-DN chain, with no exception for the
// bridge, so these are the connections a rule without an interface and
// destination match would let through: from another container on the
// bridge, from the LAN, to the gateway or the guest's LAN address, and from
// the guest itself. All are refused, as without the rules.
func TestLoopbackPortAnswersOnlyThroughTheTunnel(t *testing.T) {
	c := requireEngine(t)
	n := seq.Add(1)
	const (
		guestIP = "198.18.240.2"
		hostIP  = "198.18.240.1"
		otherIP = "198.18.241.2"
		lanIP   = "198.18.241.1"
		gateway = "198.18.250.1"
	)
	guest, host, lan := testenv.Netns(t), testenv.Netns(t), testenv.Netns(t)
	task, client := testenv.Netns(t), testenv.Netns(t)
	tunnel := "gatun0"
	loopbacknattest.Link(t, loopbacknattest.End{Netns: guest, Iface: tunnel, Addr: guestIP + "/24"},
		loopbacknattest.End{Netns: host, Iface: "eth0", Addr: hostIP + "/24"})
	loopbacknattest.Link(t, loopbacknattest.End{Netns: guest, Iface: "galan0", Addr: otherIP + "/24"},
		loopbacknattest.End{Netns: lan, Iface: "eth0", Addr: lanIP + "/24"})
	testenv.RunIn(t, host, "ip", "route", "add", "198.18.0.0/16", "via", guestIP)
	testenv.RunIn(t, lan, "ip", "route", "add", "198.18.0.0/16", "via", otherIP)

	id := uniqueID(fmt.Sprintf("tun-%d", n))
	port := 22650 + int(n)
	cni := loopbacknattest.CNI{Netns: guest, Name: "bridge", Bridge: "cni-ga0", Subnet: "198.18.250.0/24", DataDir: t.TempDir()}
	ip := cni.Add(t, "default-"+id, loopbacknattest.NetnsPath(task),
		[]loopbacknattest.PortMapping{{HostPort: port, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"}})
	cni.Add(t, "client-"+id, loopbacknattest.NetnsPath(client), nil)

	wrapper, err := testenv.IptablesWrapper(t.TempDir(), guest)
	if err != nil {
		t.Fatal(err)
	}
	sourcetest.Start(t, containerd.Name, newSource(t, loopbacknat.Options{Enabled: true, Iptables: wrapper,
		Interface: tunnel, GuestIP: guestIP}))
	labels := portsLabel(containerd.PortEntry{HostPort: port, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"})
	labels[containerd.LabelNetworks] = `["bridge"]`
	if err := c.RunContainer("default", id, labels, loopbacknattest.NetnsPath(task)); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", id) }()

	chain := cniutils.MustFormatChainNameWithPrefix("bridge", "default-"+id, "DN-")
	portmap := fmt.Sprintf("-A %s -d 127.0.0.1/32 -p tcp -m tcp --dport %d -j DNAT --to-destination %s:80", chain, port, ip)
	ours := fmt.Sprintf(`-A %s -d %s/32 -i %s -p tcp -m tcp --dport %d -m comment --comment "%s" -j DNAT --to-destination %s:80`,
		chain, guestIP, tunnel, port, loopbacknat.OwnerComment(containerd.Name), ip)
	var rules string
	testenv.Eventually(t, 30*time.Second, "the loopback NAT rule in place", func() (bool, string) {
		rules = testenv.NatRules(t, guest)
		return strings.Contains(rules, ours+"\n"), rules
	})
	if i := strings.Index(rules, portmap+"\n"); i < 0 || i > strings.Index(rules, ours) {
		t.Fatalf("portmap's rule missing or after ours:\n%s", rules)
	}

	hostNS, lanNS := loopbacknattest.NetnsPath(host), loopbacknattest.NetnsPath(lan)
	guestNS, clientNS := loopbacknattest.NetnsPath(guest), loopbacknattest.NetnsPath(client)
	at := func(addr string) string { return fmt.Sprintf("%s:%d", addr, port) }
	if _, err := loopbacknattest.Get(hostNS, at(guestIP)); err != nil {
		t.Fatalf("the host side through the tunnel to the guest address: %v", err)
	}
	for _, c := range []struct{ what, ns, addr string }{
		{"a container on the bridge to the gateway", clientNS, gateway},
		{"a container on the bridge to the guest address", clientNS, guestIP},
		{"the LAN to the guest's LAN address", lanNS, otherIP},
		{"the LAN to the guest address", lanNS, guestIP},
		{"the LAN to the gateway", lanNS, gateway},
		{"the host side through the tunnel to the gateway", hostNS, gateway},
		{"the host side through the tunnel to the guest's LAN address", hostNS, otherIP},
		{"the guest to its own tunnel address", guestNS, guestIP},
		{"the guest to the gateway", guestNS, gateway},
	} {
		loopbacknattest.Refused(t, c.what, c.ns, at(c.addr))
	}
}

// TestLoopbackPortSurvivesAContainerdRestart publishes a container's
// port on 127.0.0.1 on a CNI bridge, in a guest namespace with the tunnel
// and a second entry (wsl-proxy's upstream, its own interface and
// address), and restarts containerd under the running task: the source
// reconnects, the port's rules are still there once each, and a
// connection through either entry still reaches the container.
func TestLoopbackPortSurvivesAContainerdRestart(t *testing.T) {
	c := requireEngine(t)
	n := seq.Add(1)
	const (
		guestIP    = "198.18.243.2"
		hostIP     = "198.18.243.1"
		upstreamIP = "198.18.244.1" // the guest's end of the second entry
		defaultIP  = "198.18.244.2" // where that entry's peer connects from
	)
	guest, host, other := testenv.Netns(t), testenv.Netns(t), testenv.Netns(t)
	task := testenv.Netns(t)
	loopbacknattest.Link(t, loopbacknattest.End{Netns: guest, Iface: "garst0", Addr: guestIP + "/24"},
		loopbacknattest.End{Netns: host, Iface: "eth0", Addr: hostIP + "/24"})
	loopbacknattest.Link(t, loopbacknattest.End{Netns: guest, Iface: "garup0", Addr: upstreamIP + "/24"},
		loopbacknattest.End{Netns: other, Iface: "eth0", Addr: defaultIP + "/24"})
	testenv.RunIn(t, host, "ip", "route", "add", "198.18.0.0/16", "via", guestIP)
	testenv.RunIn(t, other, "ip", "route", "add", "198.18.0.0/16", "via", upstreamIP)

	id := uniqueID(fmt.Sprintf("rst-%d", n))
	port := 22700 + int(n)
	cni := loopbacknattest.CNI{Netns: guest, Name: "bridge", Bridge: "cni-ga1", Subnet: "198.18.251.0/24", DataDir: t.TempDir()}
	cni.Add(t, "default-"+id, loopbacknattest.NetnsPath(task),
		[]loopbacknattest.PortMapping{{HostPort: port, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"}})
	wrapper, err := testenv.IptablesWrapper(t.TempDir(), guest)
	if err != nil {
		t.Fatal(err)
	}
	src, err := containerd.New(containerd.Config{Socket: c.Socket,
		LoopbackNAT: loopbacknat.Options{Enabled: true, Iptables: wrapper, Interface: "garst0", GuestIP: guestIP},
		Entries:     []registry.Entry{{Interface: "garup0", Addr: netip.MustParseAddr(upstreamIP)}},
		Backoff:     core.Backoff{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	router := sourcetest.Start(t, containerd.Name, src)
	labels := portsLabel(containerd.PortEntry{HostPort: port, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"})
	labels[containerd.LabelNetworks] = `["bridge"]`
	if err := c.RunContainer("default", id, labels, loopbacknattest.NetnsPath(task)); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", id) }()

	comment := loopbacknat.OwnerComment(containerd.Name)
	rulesOnce := func() (bool, string) {
		rules := testenv.NatRules(t, guest)
		ok := strings.Count(rules, comment) == 2 &&
			strings.Count(rules, fmt.Sprintf("-d %s/32 -i garst0 -p tcp -m tcp --dport %d", guestIP, port)) == 1 &&
			strings.Count(rules, fmt.Sprintf("-d %s/32 -i garup0 -p tcp -m tcp --dport %d", upstreamIP, port)) == 1
		return ok, rules
	}
	answers := func(when string) {
		t.Helper()
		at := func(addr string) string { return fmt.Sprintf("%s:%d", addr, port) }
		if _, err := loopbacknattest.Get(loopbacknattest.NetnsPath(host), at(guestIP)); err != nil {
			t.Errorf("%s: through the tunnel: %v", when, err)
		}
		if _, err := loopbacknattest.Get(loopbacknattest.NetnsPath(other), at(upstreamIP)); err != nil {
			t.Errorf("%s: through the second entry: %v", when, err)
		}
	}
	testenv.Eventually(t, 30*time.Second, "one rule per entry", rulesOnce)
	answers("before the restart")

	c.Stop()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	// The source is back once it reports a container made after the
	// restart.
	later := uniqueID(fmt.Sprintf("rst-later-%d", n))
	if err := c.RunContainer("default", later, portsLabel(containerd.PortEntry{HostPort: port + 100, ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"}), ""); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", later) }()
	testenv.Eventually(t, 30*time.Second, "the source back after the restart", func() (bool, string) {
		for _, m := range router.Desired() {
			if m.ID == containerd.ID("default", later) {
				return true, ""
			}
		}
		return false, fmt.Sprint(router.Desired())
	})
	if ok, rules := rulesOnce(); !ok {
		t.Errorf("after the restart the rules are not one per entry:\n%s", rules)
	}
	answers("after the restart")
}
