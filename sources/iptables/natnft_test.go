package iptables

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/internal/testenv"
)

// oddRules are iptables-nft commands (of ip, or ip6 when they start with
// "ip6") for what the netlink reader must decode as iptables prints it:
// every protocol with ports, port ranges (all ports too), negations, gotos,
// compat tcp matches, masks that are and are not prefixes, comments that
// need quoting and one of the longest length,
// other matches around them, verdicts and compat targets, a CNI-DN chain
// that CNI-HOSTPORT-DNAT does not jump to (not read) and a chain that is
// not read.
var oddRules = [][]string{
	{"-N", "KUBE-NODEPORTS"}, {"-N", "KUBE-SERVICES"}, {"-N", "KUBE-EXT-A"}, {"-N", "KUBE-MARK-MASQ"},
	{"-N", "CNI-HOSTPORT-DNAT"}, {"-N", "CNI-DN-odd"}, {"-N", "CNI-DN-unreferenced"}, {"-N", "KUBE-SEP-X"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "31000", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "--dport", "31001", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "sctp", "-m", "sctp", "--dport", "31002", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "sctp", "-m", "sctp", "--dport", "31020:31022", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "sctp", "-m", "sctp", "--sport", "5", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "31003:31005", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "31030:", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "!", "--dport", "31006", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "!", "--dport", "31040:31041", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "31007", "--tcp-flags", "SYN,ACK", "SYN", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--tcp-option", "2", "--dport", "31008", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--tcp-option", "2", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "!", "-p", "udp", "-j", "RETURN"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "multiport", "--dports", "31010,31011", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "comment", "--comment", `with "quotes", 'apostrophes' and a \ backslash`, "-m", "tcp", "--dport", "31012", "-g", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "comment", "--comment", "plain-comment", "-m", "comment", "--comment", "second one", "-m", "tcp", "--sport", "1000", "--dport", "31013", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "!", "--sport", "1000", "--dport", "31014", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "--sport", "1000:1001", "--dport", "31015:31016", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udplite", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "comment", "--comment", strings.Repeat("c", 255), "-m", "tcp", "--dport", "31017", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-NODEPORTS", "-p", "udp", "-m", "udp", "--dport", "0:65535", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-SERVICES", "-d", "10.0.0.0/8", "-p", "tcp", "-m", "tcp", "--dport", "443", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-SERVICES", "-d", "10.1.16.0/20", "-p", "tcp", "-m", "tcp", "--dport", "444", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-SERVICES", "!", "-d", "10.1.2.3/32", "-p", "udp", "-m", "udp", "--dport", "53", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-SERVICES", "-d", "10.0.3.0/255.0.255.0", "-j", "ACCEPT"},
	{"-A", "KUBE-SERVICES", "-s", "10.9.9.9/32", "-d", "10.8.8.8/32", "-p", "tcp", "--dport", "80", "-j", "ACCEPT"},
	{"-A", "KUBE-SERVICES", "-s", "10.9.0.0/16", "-p", "tcp", "--sport", "80", "-j", "KUBE-MARK-MASQ"},
	{"-A", "KUBE-SERVICES", "-i", "eth0", "-p", "tcp", "-m", "tcp", "--dport", "81", "-m", "mark", "--mark", "0x1", "-j", "KUBE-MARK-MASQ"},
	{"-A", "KUBE-SERVICES", "-p", "icmp", "-j", "ACCEPT"},
	{"-A", "KUBE-SERVICES", "-p", "tcp", "-m", "statistic", "--mode", "random", "--probability", "0.5", "-m", "tcp", "--dport", "82", "-j", "KUBE-EXT-A"},
	{"-A", "KUBE-SERVICES", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS"},
	{"-A", "KUBE-SERVICES", "-j", "MARK", "--set-xmark", "0x4000/0x4000"},
	{"-A", "KUBE-SERVICES", "-p", "tcp", "-m", "tcp", "--dport", "83", "-j", "MASQUERADE", "--random-fully"},
	{"-A", "CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "multiport", "--dports", "8080", "-j", "CNI-DN-odd"},
	{"-A", "CNI-DN-odd", "-d", "127.0.0.1/32", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "10.4.0.2:80"},
	{"-A", "CNI-DN-odd", "-p", "udp", "-m", "udp", "--dport", "8081", "-j", "DNAT", "--to-destination", "10.4.0.2:81"},
	{"-A", "CNI-DN-odd", "-p", "tcp", "-m", "tcp", "--dport", "8082", "-j", "REDIRECT", "--to-ports", "80"},
	{"-A", "CNI-DN-unreferenced", "-p", "tcp", "-m", "tcp", "--dport", "8090", "-j", "DNAT", "--to-destination", "10.4.0.2:80"},
	{"-A", "KUBE-SEP-X", "-p", "tcp", "-m", "tcp", "-j", "DNAT", "--to-destination", "10.4.0.3:80"},
	{"ip6", "-N", "KUBE-NODEPORTS"}, {"ip6", "-N", "KUBE-EXT-B"}, {"ip6", "-N", "CNI-HOSTPORT-DNAT"}, {"ip6", "-N", "CNI-DN-six"},
	{"ip6", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", "31100", "-j", "KUBE-EXT-B"},
	{"ip6", "-A", "KUBE-NODEPORTS", "-d", "fd00:1::/64", "-p", "udp", "-m", "udp", "--dport", "31101", "-j", "KUBE-EXT-B"},
	{"ip6", "-A", "KUBE-NODEPORTS", "-d", "fd00:2::/ffff:0:ffff::", "-j", "RETURN"},
	{"ip6", "-A", "KUBE-NODEPORTS", "-p", "ipv6-icmp", "-j", "ACCEPT"},
	{"ip6", "-A", "CNI-HOSTPORT-DNAT", "-p", "tcp", "-m", "multiport", "--dports", "8080", "-j", "CNI-DN-six"},
	{"ip6", "-A", "CNI-DN-six", "-d", "::1/128", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "[fd00::2]:80"},
}

// TestNetlinkReadsWhatIptablesSavePrints writes rules with the real
// iptables-nft and ip6tables-nft in private namespaces (oddRules, and the
// kube-proxy and CNI dumps in testdata loaded with iptables-nft-restore),
// then reads them twice: over netlink, and with iptables-nft-save and
// ip6tables-nft-save parsed as the legacy back-end is. Both must give the
// same rules of the chains the source reads, field for field, and so the
// same service ports.
func TestNetlinkReadsWhatIptablesSavePrints(t *testing.T) {
	needCommands(t, "iptables-nft", "ip6tables-nft", "iptables-nft-save", "ip6tables-nft-save", "iptables-nft-restore", "ip6tables-nft-restore")
	fixture := filepath.Join("..", "..", "testdata", "iptables")
	tests := []struct {
		name      string
		load      func(t *testing.T, ns string)
		wantPorts string
	}{
		{"iptables-nft and ip6tables-nft commands", func(t *testing.T, ns string) {
			for _, c := range oddRules {
				bin := "iptables-nft"
				if c[0] == "ip6" {
					bin, c = "ip6tables-nft", c[1:]
				}
				testenv.RunIn(t, ns, append([]string{bin, "-t", "nat"}, c...)...)
			}
		}, "sctp/31002(nodeport) tcp/82(external) tcp/443(external) tcp/444(external) tcp/127.0.0.1:8080(hostport) tcp/[::1]:8080(hostport) " +
			"tcp/31000(nodeport) tcp/31006(nodeport) tcp/31007(nodeport) tcp/31008(nodeport) tcp/31012(nodeport) tcp/31013(nodeport) tcp/31017(nodeport) " +
			"tcp/31100(nodeport) udp/53(external) udp/8081(hostport) udp/31001(nodeport) udp/31014(nodeport) udp/31101(nodeport)"},
		{"kube-proxy-iptables.rules", func(t *testing.T, ns string) {
			testenv.RunIn(t, ns, "iptables-nft-restore", filepath.Join(fixture, "kube-proxy-iptables.rules"))
		}, "tcp/8088(external) tcp/8443(hostport) tcp/127.0.0.1:9090(hostport) tcp/30081(nodeport) udp/30053(nodeport)"},
		{"kube-proxy-ip6tables.rules", func(t *testing.T, ns string) {
			testenv.RunIn(t, ns, "ip6tables-nft-restore", filepath.Join(fixture, "kube-proxy-ip6tables.rules"))
		}, "tcp/8088(external) tcp/8443(hostport) tcp/[::1]:9090(hostport) tcp/30081(nodeport) udp/30053(nodeport)"},
		{"kube-proxy-v1.37.2-iptables.rules", func(t *testing.T, ns string) {
			addNfacct(t, ns, "localhost_nps_accepted_pkts") // kube-proxy makes it before its rules use it
			testenv.RunIn(t, ns, "iptables-nft-restore", filepath.Join(fixture, "kube-proxy-v1.37.2-iptables.rules"))
		}, "tcp/8088(external) tcp/30081(nodeport) tcp/30088(nodeport) udp/30053(nodeport)"},
		{"cni-portmap-loopback.rules", func(t *testing.T, ns string) {
			testenv.RunIn(t, ns, "iptables-nft-restore", filepath.Join(fixture, "cni-portmap-loopback.rules"))
		}, "tcp/8443(hostport) tcp/127.0.0.1:9090(hostport)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := testenv.Netns(t)
			tt.load(t, ns)
			s, err := New(Config{Netns: "/var/run/netns/" + ns})
			if err != nil {
				t.Fatal(err)
			}
			d, err := newRuleDumper(s.cfg.Netns)
			if err != nil {
				t.Fatal(err)
			}
			fromNetlink, err := readNatNft(d)
			d.Close()
			if err != nil {
				t.Fatal(err)
			}
			var saved []string
			for _, save := range []string{"iptables-nft-save", "ip6tables-nft-save"} {
				saved = append(saved, selectLines(strings.Split(testenv.RunIn(t, ns, save, "-t", "nat"), "\n"))...)
			}
			var fromSave []rule
			for _, l := range saved {
				r, ok := parseRule(l)
				if !ok {
					t.Fatalf("unparsable line %q", l)
				}
				fromSave = append(fromSave, r)
			}
			if len(fromSave) == 0 {
				t.Fatal("iptables-nft-save printed no rule of the chains read")
			}
			sortRules(fromNetlink)
			sortRules(fromSave)
			if !slices.Equal(fromNetlink, fromSave) {
				t.Errorf("netlink and iptables-nft-save differ:\n%s\nthe save lines:\n%s", diffRules(fromNetlink, fromSave), strings.Join(saved, "\n"))
			}
			netlinkPorts, _ := portsOf(fromNetlink)
			savePorts, _ := ParseIptables(saved)
			if got, want := portIDs(netlinkPorts), portIDs(savePorts); got != want {
				t.Errorf("ports over netlink %s, from iptables-nft-save %s", got, want)
			}
			if got := portIDs(netlinkPorts); got != tt.wantPorts {
				t.Errorf("ports\n got %s\nwant %s", got, tt.wantPorts)
			}
		})
	}
}

// addNfacct creates the extended accounting object name in ns, as
// `nfacct add` does (NFNL_SUBSYS_ACCT, NFNL_MSG_ACCT_NEW, NFACCT_NAME).
func addNfacct(t *testing.T, ns, name string) {
	t.Helper()
	f, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(f.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: 1, Data: append([]byte(name), 0)}})
	if err != nil {
		t.Fatal(err)
	}
	const nfnlSubsysAcct, nfnlMsgAcctNew = 7, 0
	_, err = c.Execute(netlink.Message{
		Header: netlink.Header{Type: nfnlSubsysAcct<<8 | nfnlMsgAcctNew, Flags: netlink.Request | netlink.Acknowledge | netlink.Create},
		Data:   append([]byte{unix.AF_UNSPEC, 0, 0, 0}, attrs...),
	})
	if err != nil {
		t.Fatalf("creating nfacct object %s: %v", name, err)
	}
}

func sortRules(rs []rule) {
	slices.SortFunc(rs, func(a, b rule) int {
		return cmp.Or(cmp.Compare(a.chain, b.chain), cmp.Compare(a.proto, b.proto), cmp.Compare(a.target, b.target),
			cmp.Compare(a.dest, b.dest), cmp.Compare(a.dport, b.dport), cmp.Compare(a.comment, b.comment))
	})
}

func diffRules(got, want []rule) string {
	var b strings.Builder
	for _, r := range got {
		if !slices.Contains(want, r) {
			fmt.Fprintf(&b, "only over netlink: %+v\n", r)
		}
	}
	for _, r := range want {
		if !slices.Contains(got, r) {
			fmt.Fprintf(&b, "only in the save:  %+v\n", r)
		}
	}
	if b.Len() == 0 {
		fmt.Fprintf(&b, "the same rules, %d and %d of them", len(got), len(want))
	}
	return b.String()
}

func portIDs(ports []ServicePort) string {
	var out []string
	for _, p := range ports {
		out = append(out, p.ID()+"("+p.Kind+")")
	}
	return strings.Join(out, " ")
}

// TestDecodeRuleReadsExpressions decodes rule messages laid out as the
// kernel sends them for rules iptables-nft and ip6tables-nft write, with
// expressions that set rather than load (skipped), and checks what
// `iptables -S` would print of each.
// decodeCase is a rule message, as the kernel sends it, and its decoding.
type decodeCase struct {
	name   string
	family nftables.TableFamily
	msg    []byte
	want   rule
}

// decodeCases builds the rule messages of TestDecodeRuleReadsExpressions
// (also FuzzDecodeRule's seeds).
func decodeCases(t testing.TB) []decodeCase {
	u32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	nested := func(as ...netlink.Attribute) []byte {
		b, err := netlink.MarshalAttributes(as)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	value := func(b []byte) []byte { return nested(netlink.Attribute{Type: unix.NFTA_DATA_VALUE, Data: b}) }
	expr := func(name string, as ...netlink.Attribute) netlink.Attribute {
		return netlink.Attribute{Type: unix.NFTA_LIST_ELEM, Data: nested(
			netlink.Attribute{Type: unix.NFTA_EXPR_NAME, Data: []byte(name + "\x00")},
			netlink.Attribute{Type: unix.NFTA_EXPR_DATA, Data: nested(as...)},
		)}
	}
	jump := func(chain string) netlink.Attribute {
		code := int32(unix.NFT_JUMP)
		return expr("immediate",
			netlink.Attribute{Type: unix.NFTA_IMMEDIATE_DREG, Data: u32(unix.NFT_REG_VERDICT)},
			netlink.Attribute{Type: unix.NFTA_IMMEDIATE_DATA, Data: nested(netlink.Attribute{Type: unix.NFTA_DATA_VERDICT, Data: nested(
				netlink.Attribute{Type: unix.NFTA_VERDICT_CODE, Data: u32(uint32(code))},
				netlink.Attribute{Type: unix.NFTA_VERDICT_CHAIN, Data: []byte(chain + "\x00")},
			)})})
	}
	load := func(base, offset, n uint32) netlink.Attribute {
		return expr("payload",
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_DREG, Data: u32(unix.NFT_REG_1)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_BASE, Data: u32(base)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_OFFSET, Data: u32(offset)},
			netlink.Attribute{Type: unix.NFTA_PAYLOAD_LEN, Data: u32(n)})
	}
	cmpEq := func(b []byte) netlink.Attribute {
		return expr("cmp",
			netlink.Attribute{Type: unix.NFTA_CMP_SREG, Data: u32(unix.NFT_REG_1)},
			netlink.Attribute{Type: unix.NFTA_CMP_OP, Data: u32(unix.NFT_CMP_EQ)},
			netlink.Attribute{Type: unix.NFTA_CMP_DATA, Data: value(b)})
	}
	udpInfo := make([]byte, 10) // struct xt_udp: spts, dpts 31000:31002, invflags
	binary.NativeEndian.PutUint16(udpInfo[4:], 31000)
	binary.NativeEndian.PutUint16(udpInfo[6:], 31002)
	tests := []struct {
		name   string
		family nftables.TableFamily
		exprs  []netlink.Attribute
		want   rule
	}{
		{"-p tcp -m tcp --dport 30080 -j KUBE-EXT-A", nftables.TableFamilyIPv4, []netlink.Attribute{
			expr("meta", netlink.Attribute{Type: unix.NFTA_META_DREG, Data: u32(unix.NFT_REG_1)}, netlink.Attribute{Type: unix.NFTA_META_KEY, Data: u32(unix.NFT_META_L4PROTO)}),
			cmpEq([]byte{unix.IPPROTO_TCP}),
			load(unix.NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
			cmpEq(binary.BigEndian.AppendUint16(nil, 30080)),
			expr("counter"),
			jump("KUBE-EXT-A"),
		}, rule{chain: "C", proto: "tcp", dport: "30080", target: "KUBE-EXT-A"}},
		{"-d fd00:1::/64 -m comment --comment svc -m udp --dport 31000:31002 -j DNAT", nftables.TableFamilyIPv6, []netlink.Attribute{
			load(unix.NFT_PAYLOAD_NETWORK_HEADER, 24, 16),
			expr("bitwise",
				netlink.Attribute{Type: unix.NFTA_BITWISE_SREG, Data: u32(unix.NFT_REG_1)},
				netlink.Attribute{Type: unix.NFTA_BITWISE_DREG, Data: u32(unix.NFT_REG_1)},
				netlink.Attribute{Type: unix.NFTA_BITWISE_MASK, Data: value([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0})}),
			cmpEq([]byte{0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}),
			expr("match", netlink.Attribute{Type: unix.NFTA_MATCH_NAME, Data: []byte("comment\x00")}, netlink.Attribute{Type: unix.NFTA_MATCH_INFO, Data: []byte("svc\x00")}),
			expr("match", netlink.Attribute{Type: unix.NFTA_MATCH_NAME, Data: []byte("udp\x00")}, netlink.Attribute{Type: unix.NFTA_MATCH_INFO, Data: udpInfo}),
			expr("target", netlink.Attribute{Type: unix.NFTA_TARGET_NAME, Data: []byte("DNAT\x00")}),
		}, rule{chain: "C", dest: "fd00:1::/64", dport: "31000:31002", comment: "svc", target: "DNAT"}},
		{"writes skipped, nat without a type", nftables.TableFamilyIPv4, []netlink.Attribute{
			expr("meta", netlink.Attribute{Type: unix.NFTA_META_KEY, Data: u32(unix.NFT_META_MARK)}, netlink.Attribute{Type: unix.NFTA_META_SREG, Data: u32(unix.NFT_REG_1)}),
			cmpEq([]byte{unix.IPPROTO_TCP}),
			expr("immediate",
				netlink.Attribute{Type: unix.NFTA_IMMEDIATE_DREG, Data: u32(unix.NFT_REG_VERDICT)},
				netlink.Attribute{Type: unix.NFTA_IMMEDIATE_DATA, Data: value([]byte{1})}),
			expr("nat"),
		}, rule{chain: "C", target: "SNAT"}},
	}
	var out []decodeCase
	for _, tt := range tests {
		msg := append([]byte{byte(tt.family), unix.NFNETLINK_V0, 0, 0}, nested(
			netlink.Attribute{Type: unix.NFTA_RULE_HANDLE, Data: binary.BigEndian.AppendUint64(nil, 7)},
			netlink.Attribute{Type: unix.NFTA_RULE_EXPRESSIONS, Data: nested(tt.exprs...)},
		)...)
		out = append(out, decodeCase{tt.name, tt.family, msg, tt.want})
	}
	return out
}

func TestDecodeRuleReadsExpressions(t *testing.T) {
	for _, tt := range decodeCases(t) {
		got, handle, err := decodeRule(tt.family, "C", tt.msg)
		if err != nil || handle != 7 || got != tt.want {
			t.Errorf("%s: decodeRule = %+v, %d, %v; want %+v, 7", tt.name, got, handle, err, tt.want)
		}
		if _, _, err := decodeRule(tt.family, "C", tt.msg[:len(tt.msg)-1]); err == nil {
			t.Errorf("%s: a truncated message decoded without an error", tt.name)
		}
	}
}
