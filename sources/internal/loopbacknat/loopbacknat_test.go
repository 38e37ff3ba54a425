package loopbacknat_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

func setup(t *testing.T) (string, *loopbacknat.Manager) {
	ns := testenv.Netns(t)
	wrapper, err := testenv.IptablesWrapper(t.TempDir(), ns)
	if err != nil {
		t.Fatal(err)
	}
	// What dockerd writes for -p 127.0.0.1:8081:80.
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", "DOCKER")
	testenv.RunIn(t, ns, "iptables", "-t", "nat", "-A", "DOCKER", "-d", "127.0.0.1/32", "!", "-i", "docker0",
		"-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "DNAT", "--to-destination", "198.18.0.2:80")
	m, err := loopbacknat.New(loopbacknat.Config{Iptables: wrapper, Chain: "DOCKER", Interface: "eth0", GuestIP: netip.MustParseAddr("192.168.127.2")})
	if err != nil {
		t.Fatal(err)
	}
	return ns, m
}

var b8081 = loopbacknat.Binding{Protocol: core.TCP, HostPort: 8081, Backend: netip.MustParseAddrPort("198.18.0.2:80")}

var rules8081 = []string{
	"-A PREROUTING -d 192.168.127.2/32 -p tcp -m tcp --dport 8081 -m comment --comment guestagent-loopback -j DNAT --to-destination 127.0.0.1:8081",
	"-A POSTROUTING -s 127.0.0.1/32 -o eth0 -p tcp -m tcp --sport 8081 -m comment --comment guestagent-loopback -j MASQUERADE",
	"-A DOCKER -p tcp -m tcp --dport 8081 -m comment --comment guestagent-loopback -j DNAT --to-destination 198.18.0.2:80",
}

func ours(rules string) []string {
	var out []string
	for l := range strings.Lines(rules) {
		if strings.Contains(l, loopbacknat.Comment) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}

func TestRulesAddedAfterDockersAndRemoved(t *testing.T) {
	ns, m := setup(t)
	for range 2 { // the second Set must not duplicate anything
		if err := m.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
			t.Fatal(err)
		}
	}
	all := testenv.NatRules(t, ns)
	if got := strings.Join(ours(all), "\n"); got != strings.Join(rules8081, "\n") {
		t.Fatalf("rules:\n%s\nwant:\n%s", got, strings.Join(rules8081, "\n"))
	}
	docker := strings.Index(all, "-A DOCKER -d 127.0.0.1/32")
	appended := strings.Index(all, rules8081[2])
	if docker < 0 || appended < docker {
		t.Errorf("the any-destination rule must come after Docker's own:\n%s", all)
	}
	if err := m.Remove("c1"); err != nil {
		t.Fatal(err)
	}
	if got := ours(testenv.NatRules(t, ns)); len(got) != 0 {
		t.Errorf("rules left after removal: %v", got)
	}
	if !strings.Contains(testenv.NatRules(t, ns), "-A DOCKER -d 127.0.0.1/32") {
		t.Error("Docker's own rule was touched")
	}
}

func TestSetReplacesChangedBindings(t *testing.T) {
	ns, m := setup(t)
	udp := loopbacknat.Binding{Protocol: core.UDP, HostPort: 5353, Backend: netip.MustParseAddrPort("198.18.0.2:53")}
	if err := m.Set("c1", []loopbacknat.Binding{b8081, udp}); err != nil {
		t.Fatal(err)
	}
	if n := len(ours(testenv.NatRules(t, ns))); n != 6 {
		t.Fatalf("%d rules, want 6", n)
	}
	if err := m.Set("c1", []loopbacknat.Binding{udp}); err != nil {
		t.Fatal(err)
	}
	got := ours(testenv.NatRules(t, ns))
	if len(got) != 3 || strings.Contains(strings.Join(got, ""), "8081") {
		t.Errorf("after dropping 8081: %v", got)
	}
}

func TestSyncRemovesLeftovers(t *testing.T) {
	ns, m := setup(t)
	old := loopbacknat.Binding{Protocol: core.TCP, HostPort: 9999, Backend: netip.MustParseAddrPort("198.18.0.9:80")}
	if err := m.Set("gone", []loopbacknat.Binding{old}); err != nil {
		t.Fatal(err)
	}
	if err := m.Set("c1", []loopbacknat.Binding{b8081}); err != nil {
		t.Fatal(err)
	}
	// A new manager, as after an agent restart, knows only what runs now.
	wrapper, _ := testenv.IptablesWrapper(t.TempDir(), ns)
	fresh, err := loopbacknat.New(loopbacknat.Config{Iptables: wrapper, Chain: "DOCKER", Interface: "eth0", GuestIP: netip.MustParseAddr("192.168.127.2")})
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.Sync(map[string][]loopbacknat.Binding{"c1": {b8081}}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(ours(testenv.NatRules(t, ns)), "\n"); got != strings.Join(rules8081, "\n") {
		t.Errorf("after Sync:\n%s\nwant:\n%s", got, strings.Join(rules8081, "\n"))
	}
}

func TestInvalidBindingsAreIgnored(t *testing.T) {
	for _, b := range []loopbacknat.Binding{
		{Protocol: core.TCP, HostPort: 0, Backend: netip.MustParseAddrPort("198.18.0.2:80")},
		{Protocol: core.TCP, HostPort: 80, Backend: netip.MustParseAddrPort("[fd00::2]:80")},
		{Protocol: "icmp", HostPort: 80, Backend: netip.MustParseAddrPort("198.18.0.2:80")},
		{Protocol: core.TCP, HostPort: 80},
	} {
		if loopbacknat.Valid(b) {
			t.Errorf("%+v reported valid", b)
		}
	}
}
