package sockets

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	descRelayActive   = prometheus.NewDesc("guestagent_sockets_relay_active", "TCP connections and UDP sessions the relays carry now.", nil, nil)
	descRelayMax      = prometheus.NewDesc("guestagent_sockets_relay_max", "TCP connections and UDP sessions every relay together may carry (--socketsRelayMaxTotal).", nil, nil)
	descRelayRefused  = prometheus.NewDesc("guestagent_sockets_relay_refused_total", "Connections and sessions the relays turned away at a limit (of a port, of one client, or of all).", nil, nil)
	descRelayAccept   = prometheus.NewDesc("guestagent_sockets_relay_accept_errors_total", "Failed accepts of the relays (out of descriptors, say), each followed by a pause.", nil, nil)
	descRelaySaturate = prometheus.NewDesc("guestagent_sockets_relay_saturated", "1 while the last new connection or session was turned away at a limit.", nil, nil)
)

// RelayCollector returns a Prometheus collector of s's relay load, read at
// each scrape: nothing while s runs no relays.
func RelayCollector(s *Source) prometheus.Collector { return relayCollector{s} }

type relayCollector struct{ s *Source }

func (relayCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRelayActive, descRelayMax, descRelayRefused, descRelayAccept, descRelaySaturate} {
		ch <- d
	}
}

func (c relayCollector) Collect(ch chan<- prometheus.Metric) {
	r := c.s.live.Load()
	if r == nil {
		return
	}
	l := r.loadNow()
	saturated := 0.0
	if l.Saturated {
		saturated = 1
	}
	ch <- prometheus.MustNewConstMetric(descRelayActive, prometheus.GaugeValue, float64(l.Active))
	ch <- prometheus.MustNewConstMetric(descRelayMax, prometheus.GaugeValue, float64(l.Max))
	ch <- prometheus.MustNewConstMetric(descRelayRefused, prometheus.CounterValue, float64(l.Refused))
	ch <- prometheus.MustNewConstMetric(descRelayAccept, prometheus.CounterValue, float64(l.AcceptErrors))
	ch <- prometheus.MustNewConstMetric(descRelaySaturate, prometheus.GaugeValue, saturated)
}
