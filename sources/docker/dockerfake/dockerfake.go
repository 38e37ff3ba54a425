// Package dockerfake serves the part of the Docker Engine API that the
// docker source uses, on a unix socket, from containers held in memory: so
// that benchmarks can feed the source faster than a real daemon can start
// containers. It answers HEAD and GET /_ping (with the Api-Version header
// the client negotiates from), GET /version, GET /containers/json (the
// running containers), GET /containers/{id}/json (an inspect with the
// state, the published ports and the bridge address) and GET /events, a
// stream of container start and die events that replays every change as
// fast as the client reads it. Paths may carry a /v1.NN version prefix.
// Filters are not applied: the fake only has running containers and only
// container events.
package dockerfake

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/api/types/network"
)

// APIVersion is the API version the fake announces.
const APIVersion = "1.43"

// Container is a running container as the fake reports it.
type Container struct {
	ID string
	// Ports are its published ports, as dockerd reports them for -p.
	Ports network.PortMap
	// IP is its address on the default bridge.
	IP netip.Addr
}

// Server is a fake Docker daemon.
type Server struct {
	sock string
	srv  *http.Server

	// stamped is called with each event as it is written to a stream.
	stamped func(events.Message)

	mu      sync.Mutex
	running map[string]Container
	streams map[*stream]struct{}
}

// stream is one open GET /events: it gets every event queued after it
// opened, as dockerd's subscribers do.
type stream struct {
	queue []events.Message // guarded by Server.mu
	wake  chan struct{}    // signalled when queue grows
}

// Start serves a fake daemon on a socket in a temporary directory of tb
// until tb ends. stamped, when not nil, is called with each event at the
// moment it is written to the event stream (its TimeNano is that moment);
// it must not block.
func Start(tb testing.TB, stamped func(events.Message)) *Server {
	tb.Helper()
	s := &Server{
		sock:    filepath.Join(tb.TempDir(), "docker.sock"),
		running: map[string]Container{},
		streams: map[*stream]struct{}{},
		stamped: stamped,
	}
	ln, err := net.Listen("unix", s.sock)
	if err != nil {
		tb.Fatalf("dockerfake: %v", err)
	}
	s.srv = &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			tb.Errorf("dockerfake: %v", err)
		}
	}()
	tb.Cleanup(func() {
		_ = s.srv.Close() // event streams are hijack-free: Close ends them
		<-done
	})
	return s
}

// Host is the daemon's address for client.WithHost or the source's Host.
func (s *Server) Host() string { return "unix://" + s.sock }

// Run makes cs running and queues a start event for each, in order, on
// every open event stream.
func (s *Server) Run(cs ...Container) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cs {
		s.running[c.ID] = c
		s.publish(event(c.ID, events.ActionStart))
	}
	s.wakeAll()
}

// Kill makes the containers ids stop and queues a die event for each on
// every open event stream.
func (s *Server) Kill(ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		delete(s.running, id)
		s.publish(event(id, events.ActionDie))
	}
	s.wakeAll()
}

// Streams is how many event streams are open.
func (s *Server) Streams() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.streams)
}

// publish queues m on every stream; the caller holds s.mu.
func (s *Server) publish(m events.Message) {
	for st := range s.streams {
		st.queue = append(st.queue, m)
	}
}

// wakeAll tells every stream its queue grew; the caller holds s.mu.
func (s *Server) wakeAll() {
	for st := range s.streams {
		select {
		case st.wake <- struct{}{}:
		default:
		}
	}
}

func event(id string, a events.Action) events.Message {
	return events.Message{Type: events.ContainerEventType, Action: a, Scope: "local",
		Actor: events.Actor{ID: id, Attributes: map[string]string{"name": id}}}
}

var versioned = regexp.MustCompile(`^/v[0-9]+\.[0-9]+/`)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/_ping", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Api-Version", APIVersion)
		w.Header().Set("Ostype", "linux")
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if r.Method != http.MethodHead {
			_, _ = w.Write([]byte("OK"))
		}
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]string{"Version": "fake", "ApiVersion": APIVersion, "MinAPIVersion": "1.24", "Os": "linux"})
	})
	mux.HandleFunc("GET /containers/json", s.list)
	mux.HandleFunc("GET /containers/{id}/json", s.inspect)
	mux.HandleFunc("GET /events", s.events)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Api-Version", APIVersion)
		if loc := versioned.FindStringIndex(r.URL.Path); loc != nil {
			r.URL.Path = r.URL.Path[loc[1]-1:]
		}
		mux.ServeHTTP(w, r)
	})
}

func (s *Server) list(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	out := make([]container.Summary, 0, len(s.running))
	for _, c := range s.running {
		out = append(out, container.Summary{ID: c.ID, Names: []string{"/" + c.ID}, State: container.StateRunning, Status: "Up"})
	}
	s.mu.Unlock()
	writeJSON(w, out)
}

func (s *Server) inspect(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s.mu.Lock()
	c, ok := s.running[id]
	s.mu.Unlock()
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		writeJSON(w, map[string]string{"message": "No such container: " + id})
		return
	}
	writeJSON(w, container.InspectResponse{
		ID:    c.ID,
		Name:  "/" + c.ID,
		State: &container.State{Status: container.StateRunning, Running: true},
		NetworkSettings: &container.NetworkSettings{
			Ports:    c.Ports,
			Networks: map[string]*network.EndpointSettings{"bridge": {IPAddress: c.IP}},
		},
	})
}

// events streams queued events until the client goes or the server
// closes. Each event is stamped as it is written; the stream is flushed
// whenever the queue runs dry, so that a burst goes out as fast as the
// socket takes it and a single event goes out at once.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()
	st := &stream{wake: make(chan struct{}, 1)}
	s.mu.Lock()
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.streams, st)
		s.mu.Unlock()
	}()
	bw := bufio.NewWriterSize(w, 32<<10)
	enc := json.NewEncoder(bw)
	for {
		s.mu.Lock()
		var m events.Message
		pending := len(st.queue) > 0
		if pending {
			m = st.queue[0]
			st.queue = st.queue[1:]
		}
		s.mu.Unlock()
		if !pending {
			if bw.Flush() != nil {
				return
			}
			flusher.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-st.wake:
			}
			continue
		}
		now := time.Now()
		m.Time, m.TimeNano = now.Unix(), now.UnixNano()
		if err := enc.Encode(m); err != nil {
			return
		}
		if s.stamped != nil {
			s.stamped(m)
		}
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	if w.Header().Get("Content-Type") == "" {
		w.Header().Set("Content-Type", "application/json")
	}
	_ = json.NewEncoder(w).Encode(v)
}

// Published returns the port map dockerd reports for -p hostPort:80 on all
// addresses: one binding on 0.0.0.0 and its [::] twin.
func Published(hostPort uint16) network.PortMap {
	port := strconv.Itoa(int(hostPort))
	return network.PortMap{
		network.MustParsePort("80/tcp"): {
			{HostIP: netip.IPv4Unspecified(), HostPort: port},
			{HostIP: netip.IPv6Unspecified(), HostPort: port},
		},
	}
}
