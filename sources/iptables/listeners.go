package iptables

import (
	"net"
	"net/netip"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// closer is an open listener, TCP or UDP.
type closer interface{ Close() error }

// listeners holds a socket on each service port, so the port shows as in
// use (and is forwarded by WSL) while kube-proxy's rules route the traffic.
type listeners struct {
	addr netip.Addr
	log  *zap.Logger
	// want counts the reported ports that need each listener (a NodePort
	// and a hostPort on the listen address share one), by key; open and
	// pending are the wanted listeners that are open and those that are
	// not (yet, or could not be).
	want    map[string]int
	open    map[string]closer
	pending map[string]pendingListener
}

// pendingListener is a wanted listener that is not open, and whether its
// failure to open was logged.
type pendingListener struct {
	port   ServicePort
	warned bool
}

// newListeners returns listeners that open on addr the ports whose rules
// bind no address.
func newListeners(addr netip.Addr, log *zap.Logger) *listeners {
	return &listeners{addr: addr, log: log, want: map[string]int{}, open: map[string]closer{}, pending: map[string]pendingListener{}}
}

// wantOpen notes that the listener of key k, for p, should be open.
func (l *listeners) wantOpen(k string, p ServicePort) {
	if _, ok := l.pending[k]; !ok && l.open[k] == nil {
		l.pending[k] = pendingListener{port: p}
	}
}

// sync makes the listeners those that ports need, and tries again the
// ones that could not be opened.
func (l *listeners) sync(ports []ServicePort) {
	want := map[string]int{}
	for _, p := range ports {
		if listened(p) {
			want[l.key(p)]++
		}
	}
	for k := range l.want {
		if want[k] == 0 {
			l.drop(k)
		}
	}
	l.want = want
	for _, p := range ports {
		if listened(p) {
			l.wantOpen(l.key(p), p)
		}
	}
	l.retry()
}

// update adds the listeners the added ports need and closes those that
// only the removed ports needed (as diffPorts gives them), and tries again
// the ones that could not be opened.
func (l *listeners) update(added, removed []ServicePort) {
	for _, p := range removed {
		if !listened(p) {
			continue
		}
		k := l.key(p)
		if l.want[k]--; l.want[k] <= 0 {
			delete(l.want, k)
			l.drop(k)
		}
	}
	for _, p := range added {
		if !listened(p) {
			continue
		}
		k := l.key(p)
		l.want[k]++
		l.wantOpen(k, p)
	}
	l.retry()
}

// listened tells whether p gets a listener: TCP and UDP ports do.
func listened(p ServicePort) bool { return p.Protocol == core.TCP || p.Protocol == core.UDP }

// drop closes the listener of key k, if it is open, and forgets it.
func (l *listeners) drop(k string) {
	if c, ok := l.open[k]; ok {
		_ = c.Close()
		delete(l.open, k)
		l.log.Debug("listener closed", zap.String("listener", k))
	}
	delete(l.pending, k)
}

// retry opens the wanted listeners that are not open; each failure is
// logged the first time.
func (l *listeners) retry() {
	for k, w := range l.pending {
		c, err := l.listen(w.port)
		if err != nil {
			if !w.warned {
				l.log.Warn("cannot open listener; port left to its current owner", zap.String("listener", k), zap.Error(err))
				l.pending[k] = pendingListener{port: w.port, warned: true}
			}
			continue
		}
		delete(l.pending, k)
		l.open[k] = c
		l.log.Debug("listener opened", zap.String("listener", k))
	}
}

// addrOf is the address p listens on.
func (l *listeners) addrOf(p ServicePort) string {
	ip := p.HostIP
	if !ip.IsValid() {
		ip = l.addr
	}
	return netip.AddrPortFrom(ip, p.Port).String()
}

// key names the listener of p: ports that share it share the key.
func (l *listeners) key(p ServicePort) string { return string(p.Protocol) + " " + l.addrOf(p) }

// listen opens the listener of p.
func (l *listeners) listen(p ServicePort) (closer, error) {
	if p.Protocol == core.UDP {
		return net.ListenPacket("udp", l.addrOf(p))
	}
	return net.Listen("tcp", l.addrOf(p))
}

// closeAll closes every open listener.
func (l *listeners) closeAll() {
	for k, c := range l.open {
		_ = c.Close()
		delete(l.open, k)
	}
}
