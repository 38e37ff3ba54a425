package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// DefaultControlSocket is where the agent serves its state to the status,
// watch and explain commands.
const DefaultControlSocket = "/run/guestagent/guestagent.sock"

// listenControl opens the control socket at path: its directory is made
// 0700 and the socket 0600, so only root reaches it. A socket another
// running agent answers on is an error; a stale one is replaced.
func listenControl(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("--controlSocket %s: another agent is running and answers on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("--controlSocket: %w", err)
	}
	return ln, nil
}

// serveHTTP serves h on ln until ctx is done.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler, log *zap.Logger, what string) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = srv.Close() // streams (watch) do not end by themselves
	})
	defer stop()
	log.Info("serving "+what, zap.String("addr", ln.Addr().String()))
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error(what+" server stopped", zap.Error(err))
	}
}

// watchEvent is one line of the watch stream.
type watchEvent struct {
	Time  time.Time `json:"time"`
	Event string    `json:"event"`
	// Port is "proto address:port".
	Port   string   `json:"port,omitempty"`
	Sink   string   `json:"sink,omitempty"`
	State  string   `json:"state,omitempty"`
	Claims []string `json:"claims,omitempty"`
	Error  string   `json:"error,omitempty"`
}

// Events of the watch stream.
const (
	evCurrent      = "current"      // the state when the stream starts
	evAdded        = "added"        // a sink took a port
	evRemoved      = "removed"      // a port went from a sink
	evFailed       = "failed"       // a sink's peer refused a port
	evRecovered    = "recovered"    // a port a peer refused was taken
	evRefused      = "refused"      // the networking mode or validation left a port out
	evConflict     = "conflict"     // another party holds the port with another target
	evElsewhere    = "held-by-peer" // another party holds the port with the same target
	evUnsupported  = "unsupported"  // a sink cannot take the port
	evPeerDown     = "peer-down"    // a sink's peer is unreachable
	evPeerUp       = "peer-up"      // and reachable again
	evDisconnected = "disconnected" // (client side) the agent went away
	evReconnected  = "reconnected"  // (client side) the agent is back
)

// addrPort renders ip:port, with a missing address as 0.0.0.0.
func addrPort(ip netip.Addr, port uint16) string {
	if !ip.IsValid() {
		ip = netip.IPv4Unspecified()
	}
	return netip.AddrPortFrom(ip, port).String()
}

func portName(ps core.PortStatus) string {
	return fmt.Sprintf("%s %s", ps.Protocol, addrPort(ps.HostIP, ps.HostPort))
}

func claimNames(ps core.PortStatus) []string {
	out := make([]string, 0, len(ps.Claims))
	for _, c := range ps.Claims {
		out = append(out, c.Key.String())
	}
	return out
}

// currentEvents describes st as the first lines of a watch stream.
func currentEvents(st core.Status, now time.Time) []watchEvent {
	var out []watchEvent
	for _, ps := range st.Ports {
		for _, at := range ps.Sinks {
			out = append(out, watchEvent{Time: now, Event: evCurrent, Port: portName(ps), Sink: at.Sink, State: at.State, Claims: claimNames(ps), Error: at.Error})
		}
	}
	for _, f := range st.Refused {
		out = append(out, watchEvent{Time: now, Event: evCurrent, Port: fmt.Sprintf("%s %s", f.Port.Protocol, addrPort(f.Port.HostIP, f.Port.HostPort)), State: evRefused, Claims: []string{f.Key.String()}, Error: f.Reason})
	}
	for _, s := range st.Sinks {
		if s.PeerDown {
			out = append(out, watchEvent{Time: now, Event: evCurrent, Sink: s.Name, State: evPeerDown, Error: s.LastError})
		}
	}
	return out
}

type portAt struct{ port, sink string }

// diffEvents returns the changes from old to cur, in a stable order.
func diffEvents(old, cur core.Status, now time.Time) []watchEvent {
	before := map[portAt]core.PortAtSink{}
	for _, ps := range old.Ports {
		for _, at := range ps.Sinks {
			before[portAt{portName(ps), at.Sink}] = at
		}
	}
	var out []watchEvent
	seen := map[portAt]bool{}
	for _, ps := range cur.Ports {
		for _, at := range ps.Sinks {
			k := portAt{portName(ps), at.Sink}
			seen[k] = true
			prev, had := before[k]
			if had && prev.State == at.State && prev.Error == at.Error {
				continue
			}
			ev := ""
			switch at.State {
			case core.PortExposed:
				ev = evAdded
				if had && (prev.State == core.PortRetrying || prev.State == core.PortRejected || prev.State == core.PortConflict) {
					ev = evRecovered
				} else if had && prev.State == core.PortExposed {
					continue
				}
			case core.PortRetrying, core.PortRejected:
				if had && prev.State == at.State {
					continue // the same failure with a new message
				}
				ev = evFailed
			case core.PortConflict:
				ev = evConflict
			case core.PortElsewhere:
				ev = evElsewhere
			case core.PortUnsupported:
				ev = evUnsupported
			case core.PortPending:
				if had && prev.State == core.PortExposed {
					ev = evRemoved // on its way out, or being replaced
					break
				}
				continue
			default:
				continue
			}
			out = append(out, watchEvent{Time: now, Event: ev, Port: k.port, Sink: k.sink, State: at.State, Claims: claimNames(ps), Error: at.Error})
		}
	}
	for _, k := range slices.SortedFunc(maps.Keys(before), func(a, b portAt) int {
		return cmp.Or(strings.Compare(a.port, b.port), strings.Compare(a.sink, b.sink))
	}) {
		if !seen[k] && before[k].State == core.PortExposed {
			out = append(out, watchEvent{Time: now, Event: evRemoved, Port: k.port, Sink: k.sink})
		}
	}
	was := map[string]bool{}
	for _, f := range old.Refused {
		was[f.Key.String()+" "+f.Port.String()] = true
	}
	for _, f := range cur.Refused {
		if !was[f.Key.String()+" "+f.Port.String()] {
			out = append(out, watchEvent{Time: now, Event: evRefused, Port: fmt.Sprintf("%s %s", f.Port.Protocol, addrPort(f.Port.HostIP, f.Port.HostPort)), Claims: []string{f.Key.String()}, Error: f.Reason})
		}
	}
	down := map[string]bool{}
	for _, s := range old.Sinks {
		down[s.Name] = s.PeerDown
	}
	for _, s := range cur.Sinks {
		switch {
		case s.PeerDown && !down[s.Name]:
			out = append(out, watchEvent{Time: now, Event: evPeerDown, Sink: s.Name, Error: s.LastError})
		case !s.PeerDown && down[s.Name]:
			out = append(out, watchEvent{Time: now, Event: evPeerUp, Sink: s.Name})
		}
	}
	return out
}

// watchHandler streams the router's changes as NDJSON, starting with its
// current state, until the client goes or the agent stops.
func watchHandler(r *core.Router) http.HandlerFunc {
	return func(w http.ResponseWriter, req *http.Request) {
		flusher, _ := w.(http.Flusher)
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		changed := r.Changed()
		st := r.Status()
		for _, ev := range currentEvents(st, time.Now()) {
			if enc.Encode(ev) != nil {
				return
			}
		}
		if flusher != nil {
			flusher.Flush()
		}
		for {
			select {
			case <-req.Context().Done():
				return
			case <-changed:
			}
			// Let a burst settle into one diff.
			select {
			case <-req.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
			changed = r.Changed()
			cur := r.Status()
			for _, ev := range diffEvents(st, cur, time.Now()) {
				if enc.Encode(ev) != nil {
					return
				}
			}
			if flusher != nil {
				flusher.Flush()
			}
			st = cur
		}
	}
}
