package iptables_test

import (
	"strings"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/iptables"
)

// FuzzParseIptables feeds arbitrary rule text to the parser: no panic, and
// every port found has a protocol and a non-zero port.
func FuzzParseIptables(f *testing.F) {
	for _, name := range []string{"kube-proxy-iptables.rules", "kube-proxy-v1.37.2-iptables.rules", "cni-portmap-loopback.rules"} {
		f.Add(strings.Join(ruleLines(f, name), "\n"))
	}
	f.Add(`-A KUBE-NODEPORTS -p tcp -m comment --comment "a \"b\"" --dport 1 -j KUBE-EXT-X`)
	f.Fuzz(func(t *testing.T, text string) {
		ports, _ := iptables.ParseIptables(strings.Split(text, "\n"))
		for _, p := range ports {
			if p.Port == 0 || (p.Protocol != core.TCP && p.Protocol != core.UDP && p.Protocol != core.SCTP) {
				t.Fatalf("bad port %+v", p)
			}
		}
		_ = iptables.Fields(text)
	})
}

// FuzzParseNft feeds arbitrary map element keys to the nftables decoders.
func FuzzParseNft(f *testing.F) {
	f.Add([]byte{6, 0, 0, 0, 0x78, 0x81, 0, 0}, "external-x", 4)
	f.Add([]byte{172, 18, 255, 200, 6, 0, 0, 0, 0x1f, 0x98, 0, 0}, "external-y", 4)
	f.Fuzz(func(t *testing.T, key []byte, chain string, addrLen int) {
		if addrLen < 0 || addrLen > 64 {
			return
		}
		el := []iptables.NftElement{{Key: key, Chain: chain}}
		for _, p := range append(iptables.ParseNodePorts(el), iptables.ParseServiceIPs(el, addrLen)...) {
			if p.Port == 0 {
				t.Fatalf("port 0 from %x", key)
			}
		}
	})
}
