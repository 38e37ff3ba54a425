package iptables_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	cniutils "github.com/containernetworking/plugins/pkg/utils"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/loopbacknattest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
	"github.com/guestagent/guestagent/sources/iptables"
)

// TestLoopbackNATRulesAreNotReported runs the real CNI bridge and portmap
// plugins in a private namespace for a container with
// -p 127.0.0.1:9090:80 -p 8443:443, adds the containerd source's loopback
// NAT rules for 9090 next to them (with iptables-nft), and an untagged one
// as earlier agent versions wrote it, then scans with the service
// listener address 0.0.0.0: 9090 is reported on 127.0.0.1 only, 8443 on
// 0.0.0.0, and nothing else. Both readers run, iptables-nft and nftables:
// the agent's rules are nft rules of table ip nat, which the nftables
// reader (kube-proxy's maps) does not read.
func TestLoopbackNATRulesAreNotReported(t *testing.T) {
	r := newRig(t, "iptables-nft")
	task := testenv.Netns(t)
	cni := loopbacknattest.CNI{Netns: r.ns, Name: "bridge", Bridge: "cni-ga0", Subnet: "198.18.251.0/24", DataDir: t.TempDir()}
	const id = "default-c1"
	ip := cni.Add(t, id, loopbacknattest.NetnsPath(task), []loopbacknattest.PortMapping{
		{HostPort: 9090, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"},
		{HostPort: 8443, ContainerPort: 443, Protocol: "tcp"},
	})
	chain := cniutils.MustFormatChainNameWithPrefix("bridge", id, "DN-")
	nat, err := loopbacknat.New(loopbacknat.Config{Owner: "containerd", Iptables: r.wrapper, Interface: "eth0",
		GuestIP: netip.MustParseAddr("192.168.127.2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := nat.Set(id, []loopbacknat.Binding{{Protocol: core.TCP, HostPort: 9090, Backend: netip.AddrPortFrom(ip, 80), Chain: chain}}); err != nil {
		t.Fatal(err)
	}
	r.run(t, "-t", "nat", "-A", chain, "-p", "tcp", "-m", "tcp", "--dport", "9090", "-m", "comment", "--comment", loopbacknat.CommentPrefix,
		"-j", "DNAT", "--to-destination", netip.AddrPortFrom(ip, 80).String())
	if rules := testenv.NatRules(t, r.ns); strings.Count(rules, loopbacknat.CommentPrefix) != 2 || !strings.Contains(rules, "-A "+chain+" -d 127.0.0.1/32") {
		t.Fatalf("portmap's and the agent's rules not in place:\n%s", rules)
	}

	s, err := iptables.New(iptables.Config{Commands: []string{r.wrapper}, Interval: time.Hour,
		Netns: loopbacknattest.NetnsPath(r.ns), ListenAddr: netip.IPv4Unspecified()})
	if err != nil {
		t.Fatal(err)
	}
	router := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, router.Emitter(iptables.Name)) }()
	defer func() { cancel(); <-done }()
	const want = "0.0.0.0:8443->8443/tcp 127.0.0.1:9090->9090/tcp"
	testenv.Eventually(t, 20*time.Second, "the ports "+want, func() (bool, string) {
		var got []string
		for _, m := range router.Desired() {
			for _, p := range m.Ports {
				got = append(got, p.String())
			}
		}
		return strings.Join(sorted(got), " ") == want, fmt.Sprintf("reported %v", got)
	})
}
