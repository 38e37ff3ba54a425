package iptables

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/google/nftables"
)

// dportShape is how iptables prints a destination port match: a port or
// a range.
var dportShape = regexp.MustCompile(`^[0-9]{1,5}(:[0-9]{1,5})?$`)

// FuzzDecodeRule feeds arbitrary netlink rule messages to the nftables
// rule decoder: no panic, and what it decodes is shaped as iptables
// prints it (a port or range, an address with a prefix or mask, no NUL
// in a name).
func FuzzDecodeRule(f *testing.F) {
	for _, c := range decodeCases(f) {
		f.Add(c.family == nftables.TableFamilyIPv6, c.msg)
	}
	f.Fuzz(func(t *testing.T, six bool, msg []byte) {
		family := nftables.TableFamilyIPv4
		if six {
			family = nftables.TableFamilyIPv6
		}
		r, _, err := decodeRule(family, "C", msg)
		if err != nil {
			return
		}
		if r.chain != "C" {
			t.Fatalf("chain %q", r.chain)
		}
		if r.dport != "" && !dportShape.MatchString(r.dport) {
			t.Fatalf("dport %q", r.dport)
		}
		if r.dest != "" {
			addr, mask, _ := strings.Cut(r.dest, "/")
			if _, err := netip.ParseAddr(addr); err != nil {
				t.Fatalf("dest %q: %v", r.dest, err)
			}
			if _, err := netip.ParsePrefix(r.dest); err != nil {
				if _, err := netip.ParseAddr(mask); err != nil {
					t.Fatalf("dest %q is neither a prefix nor an address with a mask", r.dest)
				}
			}
		}
		for _, s := range []string{r.proto, r.target, r.comment} {
			if strings.ContainsRune(s, 0) {
				t.Fatalf("a NUL in %q", s)
			}
		}
	})
}
