package iptables_test

import (
	"fmt"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/iptables"
)

// latencySamples is how many rule changes BenchmarkDeliveryLatency times
// per back-end.
const latencySamples = 200

// BenchmarkDeliveryLatency measures, in a private namespace given to the
// source as --iptablesNetns alone, with the default settings (3 s scan
// interval, so change notifications are what make it quick), the time
// from the start of the command that adds a NodePort (a KUBE-NODEPORTS
// rule with iptables-nft, or a service-nodeports element with nft; its
// target chain is made beforehand) to the delivery of the port to a sink,
// one change at a time.
func BenchmarkDeliveryLatency(b *testing.B) {
	b.Run("iptables-nft", func(b *testing.B) {
		r := newRig(b, "iptables-nft")
		r.run(b, "-t", "nat", "-N", "KUBE-NODEPORTS")
		r.run(b, "-t", "nat", "-N", "KUBE-SERVICES")
		benchLatency(b, r, func(port int) func() {
			chain := fmt.Sprintf("KUBE-EXT-%016X", port)
			r.run(b, "-t", "nat", "-N", chain)
			return func() {
				r.run(b, "-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(port), "-j", chain)
			}
		})
	})
	b.Run("nftables", func(b *testing.B) {
		r := newRig(b, "iptables-nft")
		if _, err := exec.LookPath("nft"); err != nil {
			testenv.Missing(b, "nft")
		}
		r.nft(b, "add", "table", "ip", "kube-proxy")
		r.nft(b, "add", "map", "ip", "kube-proxy", "service-nodeports", "{ type inet_proto . inet_service : verdict ; }")
		benchLatency(b, r, func(port int) func() {
			chain := fmt.Sprintf("external-%08X-default/svc%d/tcp/http", port, port)
			r.nft(b, "add", "chain", "ip", "kube-proxy", chain)
			return func() {
				r.nft(b, "add", "element", "ip", "kube-proxy", "service-nodeports", fmt.Sprintf("{ tcp . %d : goto %s }", port, chain))
			}
		})
	})
}

// benchLatency times latencySamples NodePorts: prepare makes what a port
// needs and returns the change that adds it.
func benchLatency(b *testing.B, r *rig, prepare func(port int) func()) {
	arrivals := sourcetest.Deliver(b, iptables.Name, r.source(b, false, 3*time.Second))
	var lat []time.Duration
	port := 30000
	for b.Loop() {
		for range latencySamples {
			port++
			add := prepare(port)
			start := time.Now()
			add()
			lat = append(lat, arrivals.Wait(b, uint16(port), 30*time.Second).Sub(start))
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.50)), "p50-ms")
	b.ReportMetric(ms(sourcetest.Percentile(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(slices.Max(lat)), "max-ms")
	b.ReportMetric(float64(len(lat)), "samples")
}
