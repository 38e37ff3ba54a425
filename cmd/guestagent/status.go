package main

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// metrics holds what the agent measures itself, beside what the router's
// status gives at each scrape.
type metrics struct {
	latency *prometheus.HistogramVec
	plugins []prometheus.Collector // the plugins' own (registry.Env.Metrics)
}

// add is registry.Env.Metrics: it keeps c for every server's /metrics.
func (m *metrics) add(c prometheus.Collector) { m.plugins = append(m.plugins, c) }

func newMetrics() *metrics {
	return &metrics{latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "guestagent_delivery_latency_seconds",
		Help:    "Time from a source's change reaching the router to a sink taking the port, by sink, source and operation (add, remove).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"sink", "source", "op"})}
}

// delivered is the router's Delivered hook.
func (m *metrics) delivered(sink, source string, remove bool, latency time.Duration) {
	op := "add"
	if remove {
		op = "remove"
	}
	m.latency.WithLabelValues(sink, source, op).Observe(latency.Seconds())
}

// metricsMaxAge is how old a snapshot of the router's status a scrape of
// /metrics may reuse.
const metricsMaxAge = time.Second

// snapshots shares the router's status among the agent's readers. A
// reader asks for a status taken after a given moment; one that asks while
// a snapshot is being taken waits for it, or for the next one when that
// one began too early, so that many clients asking in a loop cost the
// router about what one does. The statuses it returns are shared: readers
// must not change them.
type snapshots struct {
	r *core.Router

	mu     sync.Mutex
	last   core.Status // mu: the latest one taken
	lastAt time.Time   // mu: when last began; zero before the first
	taking *snapshot   // mu: the one being taken, or nil
}

// snapshot is one status being taken; done closes once st is set.
type snapshot struct {
	start time.Time
	st    core.Status
	done  chan struct{}
}

func newSnapshots(r *core.Router) *snapshots { return &snapshots{r: r} }

// since returns a status of the router taken no earlier than t.
func (s *snapshots) since(t time.Time) core.Status {
	s.mu.Lock()
	for {
		if !s.lastAt.IsZero() && !s.lastAt.Before(t) {
			st := s.last
			s.mu.Unlock()
			return st
		}
		f := s.taking
		if f == nil {
			break
		}
		s.mu.Unlock()
		<-f.done
		if !f.start.Before(t) {
			return f.st
		}
		s.mu.Lock()
	}
	f := &snapshot{start: time.Now(), done: make(chan struct{})}
	s.taking = f
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.taking == f {
			s.taking = nil
		}
		if f.start.After(s.lastAt) {
			s.last, s.lastAt = f.st, f.start
			// Let it go once no reader may reuse it: a status of many
			// ports is large.
			time.AfterFunc(metricsMaxAge, func() { s.forget(f.start) })
		}
		s.mu.Unlock()
		close(f.done)
	}()
	f.st = s.r.Status()
	return f.st
}

// forget drops the latest status if it is still the one taken at start.
func (s *snapshots) forget(start time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastAt.Equal(start) {
		s.last, s.lastAt = core.Status{}, time.Time{}
	}
}

// statusHandler serves /status (the router's state as JSON), /watch (its
// changes as NDJSON) and /metrics (for Prometheus) for one server: each
// server has its own, so that its /watch streams are counted apart.
func statusHandler(snap *snapshots, m *metrics, log *zap.Logger) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(routerCollector{snap})
	if m != nil {
		reg.MustRegister(m.latency)
		reg.MustRegister(m.plugins...)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /watch", watchHandler(snap, maxWatches, log))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		st := snap.since(time.Now())
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(statusForJSON(st))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

var (
	descMappings  = prometheus.NewDesc("guestagent_mappings", "Mappings that should be exposed, by source.", []string{"source"}, nil)
	descPorts     = prometheus.NewDesc("guestagent_ports", "Ports that should be exposed, by source.", []string{"source"}, nil)
	descRefused   = prometheus.NewDesc("guestagent_refused_ports", "Ports left out by validation or the networking mode's policy.", nil, nil)
	descPending   = prometheus.NewDesc("guestagent_sink_pending", "Changes waiting for delivery, by sink.", []string{"sink"}, nil)
	descDelivered = prometheus.NewDesc("guestagent_sink_delivered_total", "Changes delivered, by sink.", []string{"sink"}, nil)
	descFailures  = prometheus.NewDesc("guestagent_sink_failures_total", "Failed deliveries (retried), by sink.", []string{"sink"}, nil)
	descRejected  = prometheus.NewDesc("guestagent_sink_rejected_total", "Changes a sink can never apply, by sink.", []string{"sink"}, nil)
	descSyncs     = prometheus.NewDesc("guestagent_sink_syncs_total", "Full-state replays, by sink.", []string{"sink"}, nil)
	descPeerDown  = prometheus.NewDesc("guestagent_sink_peer_down", "1 while a sink's peer cannot be reached.", []string{"sink"}, nil)
	descPortState = prometheus.NewDesc("guestagent_sink_ports", "Claimed host addresses by sink and state (exposed, pending, retrying, rejected, unsupported, held-by-peer, conflict).", []string{"sink", "state"}, nil)
	descConflicts = prometheus.NewDesc("guestagent_port_conflicts", "Claims on a host address that name other backend addresses than the claim holding it.", nil, nil)
)

// routerCollector reads the router's status at each scrape, sharing one
// taken up to metricsMaxAge before.
type routerCollector struct{ snap *snapshots }

func (routerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMappings, descPorts, descRefused, descPending, descDelivered, descFailures, descRejected, descSyncs, descPeerDown, descPortState, descConflicts} {
		ch <- d
	}
}

func (c routerCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.snap.since(time.Now().Add(-metricsMaxAge))
	mappings, ports := map[string]int{}, map[string]int{}
	for _, m := range st.Mappings {
		mappings[m.Source]++
		ports[m.Source] += len(m.Ports)
	}
	for src, n := range mappings {
		ch <- prometheus.MustNewConstMetric(descMappings, prometheus.GaugeValue, float64(n), src)
		ch <- prometheus.MustNewConstMetric(descPorts, prometheus.GaugeValue, float64(ports[src]), src)
	}
	ch <- prometheus.MustNewConstMetric(descRefused, prometheus.GaugeValue, float64(len(st.Refused)))
	states := map[[2]string]int{}
	conflicts := 0
	for _, ps := range st.Ports {
		for _, c := range ps.Claims {
			if c.Conflict != "" {
				conflicts++
			}
		}
		for _, at := range ps.Sinks {
			states[[2]string{at.Sink, at.State}]++
		}
	}
	for _, s := range st.Sinks {
		for _, state := range []string{core.PortExposed, core.PortPending, core.PortRetrying, core.PortRejected, core.PortUnsupported, core.PortElsewhere, core.PortConflict} {
			ch <- prometheus.MustNewConstMetric(descPortState, prometheus.GaugeValue, float64(states[[2]string{s.Name, state}]), s.Name, state)
		}
	}
	ch <- prometheus.MustNewConstMetric(descConflicts, prometheus.GaugeValue, float64(conflicts))
	for _, s := range st.Sinks {
		down := 0.0
		if s.PeerDown {
			down = 1
		}
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(s.Pending), s.Name)
		ch <- prometheus.MustNewConstMetric(descDelivered, prometheus.CounterValue, float64(s.Delivered), s.Name)
		ch <- prometheus.MustNewConstMetric(descFailures, prometheus.CounterValue, float64(s.Failures), s.Name)
		ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(s.Rejected), s.Name)
		ch <- prometheus.MustNewConstMetric(descSyncs, prometheus.CounterValue, float64(s.Syncs), s.Name)
		ch <- prometheus.MustNewConstMetric(descPeerDown, prometheus.GaugeValue, down, s.Name)
	}
}
