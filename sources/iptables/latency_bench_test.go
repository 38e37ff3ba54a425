package iptables_test

import (
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sources/iptables"
)

// BenchmarkDeliveryLatency measures, in a private namespace, the time from
// the start of the command that writes a kube-proxy node port rule to the
// delivery of that port to a sink, with the default 3s scan interval (so
// change notifications are what make it quick).
func BenchmarkDeliveryLatency(b *testing.B) {
	b.Run("iptables-nft", func(b *testing.B) {
		r := newRig(b, "iptables-nft")
		r.run(b, "-t", "nat", "-N", "KUBE-NODEPORTS")
		r.run(b, "-t", "nat", "-N", "KUBE-SERVICES")
		benchLatency(b, r, func(port int) {
			chain := fmt.Sprintf("KUBE-EXT-%016X", port)
			r.run(b, "-t", "nat", "-N", chain)
			r.run(b, "-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(port), "-j", chain)
		})
	})
	b.Run("nftables", func(b *testing.B) {
		r := newRig(b, "iptables-nft")
		if _, err := exec.LookPath("nft"); err != nil {
			testenv.Missing(b, "nft")
		}
		r.nft(b, "add", "table", "ip", "kube-proxy")
		r.nft(b, "add", "map", "ip", "kube-proxy", "service-nodeports", "{ type inet_proto . inet_service : verdict ; }")
		benchLatency(b, r, func(port int) {
			chain := fmt.Sprintf("external-%08X-default/svc%d/tcp/http", port, port)
			r.nft(b, "add", "chain", "ip", "kube-proxy", chain)
			r.nft(b, "add", "element", "ip", "kube-proxy", "service-nodeports", fmt.Sprintf("{ tcp . %d : goto %s }", port, chain))
		})
	})
}

func benchLatency(b *testing.B, r *rig, add func(port int)) {
	arrivals := sourcetest.Deliver(b, iptables.Name, r.source(b, false, 3*time.Second))
	sourcetest.MeasureLatency(b, arrivals, func(i int) (uint16, time.Time) {
		port := 30000 + i
		start := time.Now()
		add(port)
		return uint16(port), start
	})
}
