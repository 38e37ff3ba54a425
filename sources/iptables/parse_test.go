package iptables_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
	"github.com/guestagent/guestagent/sources/iptables"
)

// ruleLines returns the "-A" lines of an iptables-restore file: the same
// text `iptables -t nat -S` prints.
func ruleLines(t testing.TB, name string) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "iptables", name))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for l := range strings.Lines(string(data)) {
		if strings.HasPrefix(l, "-A ") {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}

func ids(ports []iptables.ServicePort) string {
	var out []string
	for _, p := range ports {
		out = append(out, p.ID()+"("+p.Kind+")")
	}
	return strings.Join(out, " ")
}

func TestParseIptablesFixture(t *testing.T) {
	ports, cni := iptables.ParseIptables(ruleLines(t, "kube-proxy-iptables.rules"))
	want := "tcp/8088(external) tcp/8443(hostport) tcp/127.0.0.1:9090(hostport) tcp/30081(nodeport) udp/30053(nodeport)"
	if got := ids(ports); got != want {
		t.Errorf("ports\n got %s\nwant %s", got, want)
	}
	if !slices.Equal(cni, []string{"CNI-DN-3e5d0a8c1b6f7e2d9a4c1"}) {
		t.Errorf("CNI chains %v", cni)
	}
}

// TestParseRealDump parses `iptables-save -t nat` of kube-proxy v1.37.2
// (iptables mode) for a NodePort tcp, a NodePort udp, a LoadBalancer and a
// ClusterIP service; the localhost NodePort rules carry an nfacct match.
func TestParseRealDump(t *testing.T) {
	ports, _ := iptables.ParseIptables(ruleLines(t, "kube-proxy-v1.37.2-iptables.rules"))
	want := "tcp/8088(external) tcp/30081(nodeport) tcp/30088(nodeport) udp/30053(nodeport)"
	if got := ids(ports); got != want {
		t.Errorf("ports\n got %s\nwant %s", got, want)
	}
}

// TestParseCNIHostPortsBesideLoopbackNAT parses a dump of the nat table
// with the real portmap plugin's rules for a container run with
// -p 127.0.0.1:9090:80 -p 8443:443, the containerd source's loopback NAT
// rules for 9090, and one untagged rule as earlier agent versions wrote
// it. The hostPort on 127.0.0.1 stays on 127.0.0.1, and no rule of the
// agent adds a port, whatever its chain or address match.
func TestParseCNIHostPortsBesideLoopbackNAT(t *testing.T) {
	dump := ruleLines(t, "cni-portmap-loopback.rules")
	agents := func(keep bool) []string {
		return slices.DeleteFunc(slices.Clone(dump), func(l string) bool {
			return strings.Contains(l, loopbacknat.CommentPrefix) != keep
		})
	}
	if n := len(agents(true)); n != 4 {
		t.Fatalf("the fixture has %d loopback NAT rules, want 4", n)
	}
	const hostPorts = "tcp/8443(hostport) tcp/127.0.0.1:9090(hostport)"
	tests := []struct {
		name  string
		lines []string
		want  string
	}{
		{"the whole dump", dump, hostPorts},
		{"portmap's rules alone", agents(false), hostPorts},
		{"the agent's rules alone", agents(true), ""},
		// The same rules under another comment would be hostPorts: the
		// comment is what tells them apart.
		{"the agent's rules under another comment", slices.Collect(func(yield func(string) bool) {
			for _, l := range agents(true) {
				l = strings.ReplaceAll(l, `"`+loopbacknat.OwnerComment("containerd")+`"`, "other")
				if !yield(strings.ReplaceAll(l, "--comment "+loopbacknat.CommentPrefix+" ", "--comment other ")) {
					return
				}
			}
		}), "tcp/9090(hostport) tcp/192.168.127.2:9090(hostport)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ports, _ := iptables.ParseIptables(tt.lines)
			if got := ids(ports); got != tt.want {
				t.Errorf("ports\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestParseIptablesOddLines(t *testing.T) {
	lines := []string{
		"",
		"-N KUBE-NODEPORTS",
		"-P PREROUTING ACCEPT",
		`-A KUBE-NODEPORTS -p tcp -m comment --comment "ns/with space:\"quoted\"" -m tcp --dport 31000 -j KUBE-EXT-X`,
		"-A KUBE-NODEPORTS -p tcp -m tcp --dport 99999 -j KUBE-EXT-X",
		"-A KUBE-NODEPORTS -p tcp -m tcp --dport 0 -j KUBE-EXT-X",
		"-A KUBE-NODEPORTS -p icmp -j KUBE-EXT-X",
		"-A KUBE-NODEPORTS -p tcp -m tcp --dport 31001 -j KUBE-MARK-MASQ",
		"-A KUBE-NODEPORTS -p tcp -m tcp --dport",
		"-A KUBE-SERVICES -d 10.43.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-X",
		"-A CNI-DN-abc -d 10.0.0.0/8 -p udp -m udp --dport 5000 -j DNAT --to-destination 10.42.0.2:5000",
		"garbage \"unterminated",
	}
	ports, _ := iptables.ParseIptables(lines)
	if got := ids(ports); got != "tcp/31000(nodeport) udp/5000(hostport)" {
		t.Errorf("got %s", got)
	}
}

func TestFields(t *testing.T) {
	got := iptables.Fields(`-A X -m comment --comment "a b \"c\"" -j Y`)
	want := []string{"-A", "X", "-m", "comment", "--comment", `a b "c"`, "-j", "Y"}
	if !slices.Equal(got, want) {
		t.Errorf("%q", got)
	}
	if got := iptables.Fields(`--comment ""`); len(got) != 2 || got[1] != "" {
		t.Errorf("empty quoted argument lost: %q", got)
	}
}

func TestParseNftElements(t *testing.T) {
	key := func(b ...byte) []byte { return b }
	nodeports := []iptables.NftElement{
		{Key: key(6, 0, 0, 0, 0x78, 0x81, 0, 0), Chain: "external-42NFTM6N-default/nginx/tcp/http"}, // tcp . 30849
		{Key: key(17, 0, 0, 0, 0x76, 0x05, 0, 0), Chain: "external-LB7QMAJT-default/dns/udp/dns"},   // udp . 30213
		{Key: key(6, 0, 0, 0, 0x78, 0x81, 0, 0), Chain: "external-dup"},                             // same port again
		{Key: key(1, 0, 0, 0, 0, 1, 0, 0), Chain: "external-icmp"},                                  // not a port protocol
		{Key: key(6, 0, 0), Chain: "external-short"},                                                // truncated
		{Key: key(6, 0, 0, 0, 0x78, 0x82, 0, 0), Chain: "service-clusterip"},                        // not external
	}
	if got := ids(iptables.ParseNodePorts(nodeports)); got != "tcp/30849(nodeport) udp/30213(nodeport)" {
		t.Errorf("nodeports: %s", got)
	}
	ips := []iptables.NftElement{
		{Key: key(172, 18, 255, 200, 6, 0, 0, 0, 0x1f, 0x98, 0, 0), Chain: "external-42NFTM6N-default/nginx/tcp/http"}, // . tcp . 8088
		{Key: key(10, 43, 0, 1, 6, 0, 0, 0, 0x01, 0xbb, 0, 0), Chain: "service-2QRHZV4L-default/kubernetes/tcp/https"},
	}
	if got := ids(iptables.ParseServiceIPs(ips, 4)); got != "tcp/8088(external)" {
		t.Errorf("service-ips: %s", got)
	}
	v6 := []iptables.NftElement{{Key: append(make([]byte, 16), 17, 0, 0, 0, 0x00, 0x35, 0, 0), Chain: "external-x"}}
	if got := ids(iptables.ParseServiceIPs(v6, 16)); got != "udp/53(external)" {
		t.Errorf("ip6 service-ips: %s", got)
	}
}

// BenchmarkParseIptables parses the rules of 10,000 NodePort services (a
// KUBE-NODEPORTS and a KUBE-SERVICES rule each) per iteration.
func BenchmarkParseIptables(b *testing.B) {
	lines := generatedRules(10000)
	b.ReportAllocs()
	for b.Loop() {
		ports, _ := iptables.ParseIptables(lines)
		if len(ports) != 10000 {
			b.Fatalf("%d ports", len(ports))
		}
	}
	b.ReportMetric(float64(len(lines)), "rules")
}

func generatedRules(n int) []string {
	lines := make([]string, 0, 2*n)
	for i := range n {
		h := fmt.Sprintf("%016X", i)
		lines = append(lines,
			fmt.Sprintf(`-A KUBE-NODEPORTS -p tcp -m comment --comment "ns/svc-%d:http" -m tcp --dport %d -j KUBE-EXT-%s`, i, 20000+i, h),
			fmt.Sprintf(`-A KUBE-SERVICES -d 10.43.%d.%d/32 -p tcp -m comment --comment "ns/svc-%d:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-%s`, i/256, i%256, i, h))
	}
	return lines
}
