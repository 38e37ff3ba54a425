package hostswitch_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// scripted is a forwarder API whose answers a test chooses.
type scripted struct {
	mu       sync.Mutex
	requests []string // "path body"
	answer   func(path string, f hostswitch.Forward) (int, string)
}

func (s *scripted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var f hostswitch.Forward
	_ = json.Unmarshal(body, &f)
	s.mu.Lock()
	s.requests = append(s.requests, r.URL.Path+" "+strings.TrimSpace(string(body)))
	answer := s.answer
	s.mu.Unlock()
	status, text := answer(r.URL.Path, f)
	w.WriteHeader(status)
	_, _ = io.WriteString(w, text)
}

func (s *scripted) log() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.requests...)
}

func serve(t *testing.T, answer func(string, hostswitch.Forward) (int, string)) (*scripted, string) {
	s := &scripted{answer: answer}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv.URL
}

func ok(string, hostswitch.Forward) (int, string) { return 200, "" }

func port(proto core.Protocol, ip string, hp uint16) core.Port {
	p := core.Port{Protocol: proto, ContainerPort: 80, HostPort: hp}
	if ip != "" {
		p.HostIP = netip.MustParseAddr(ip)
	}
	return p
}

func TestRequestsMatchTheAPI(t *testing.T) {
	api, url := serve(t, ok)
	s := newSink(t, url, 0)
	m := core.Mapping{Key: core.Key{Source: "docker", ID: "c"}, Ports: []core.Port{
		port(core.TCP, "0.0.0.0", 8080),
		port(core.UDP, "127.0.0.1", 5353),
		port(core.TCP, "", 9090),
	}}
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	want := []string{
		`/services/forwarder/expose {"local":"0.0.0.0:8080","remote":"192.168.127.2:8080","protocol":"tcp"}`,
		`/services/forwarder/expose {"local":"127.0.0.1:5353","remote":"192.168.127.2:5353","protocol":"udp"}`,
		`/services/forwarder/expose {"local":"0.0.0.0:9090","remote":"192.168.127.2:9090","protocol":"tcp"}`,
		`/services/forwarder/unexpose {"local":"0.0.0.0:8080","protocol":"tcp"}`,
		`/services/forwarder/unexpose {"local":"127.0.0.1:5353","protocol":"udp"}`,
		`/services/forwarder/unexpose {"local":"0.0.0.0:9090","protocol":"tcp"}`,
	}
	if got := api.log(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestUnsupportedPortsAreReportedNotDropped(t *testing.T) {
	api, url := serve(t, ok)
	s := newSink(t, url, 0)
	m := core.Mapping{Key: core.Key{ID: "c"}, Ports: []core.Port{
		port(core.TCP, "::", 8080),
		port(core.SCTP, "0.0.0.0", 9000),
		port(core.TCP, "0.0.0.0", 8080),
	}}
	err := s.Send(context.Background(), core.Change{Mapping: m})
	if !errors.Is(err, core.ErrPermanent) || !strings.Contains(err.Error(), "IPv4 only") || !strings.Contains(err.Error(), "tcp and udp only") {
		t.Fatalf("err = %v, want a permanent error naming the IPv6 and sctp ports", err)
	}
	if got := api.log(); len(got) != 1 || !strings.Contains(got[0], `"local":"0.0.0.0:8080"`) {
		t.Errorf("the supported port must still be exposed; requests %v", got)
	}
}

func TestSupportsTCPAndUDPOnIPv4(t *testing.T) {
	s := newSink(t, "http://127.0.0.1:1", 0)
	for _, tt := range []struct {
		p  core.Port
		ok bool
	}{
		{port(core.TCP, "0.0.0.0", 80), true},
		{port(core.UDP, "127.0.0.1", 53), true},
		{port(core.TCP, "", 8080), true},
		{port(core.TCP, "::", 8080), false},
		{port(core.TCP, "::1", 8080), false},
		{port(core.SCTP, "0.0.0.0", 9000), false},
	} {
		if err := s.Supports(tt.p); (err == nil) != tt.ok {
			t.Errorf("Supports(%s) = %v, want ok %v", tt.p, err, tt.ok)
		}
	}
}

func TestListReportsWhichForwardsMatch(t *testing.T) {
	_, url := serve(t, func(string, hostswitch.Forward) (int, string) {
		return 200, `[{"local":"127.0.0.1:6443","remote":"192.168.127.2:6443","protocol":"tcp"},
			{"local":"127.0.0.1:2222","remote":"192.168.127.2:22","protocol":"tcp"},
			{"local":":9090","remote":"192.168.127.2:9090","protocol":"udp"},
			{"local":"[::1]:80","remote":"192.168.127.2:80"},
			{"local":"garbage","remote":"192.168.127.2:1"}]`
	})
	held, err := newSink(t, url, 0).List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []core.Held{
		{Port: core.Port{Protocol: core.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 6443}, Target: "192.168.127.2:6443", Matches: true},
		{Port: core.Port{Protocol: core.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 2222}, Target: "192.168.127.2:22"},
		{Port: core.Port{Protocol: core.UDP, HostIP: netip.IPv4Unspecified(), HostPort: 9090}, Target: "192.168.127.2:9090", Matches: true},
		{Port: core.Port{Protocol: core.TCP, HostIP: netip.IPv6Loopback(), HostPort: 80}, Target: "192.168.127.2:80"},
	}
	if len(held) != len(want) {
		t.Fatalf("List = %+v, want %+v", held, want)
	}
	for i := range want {
		if held[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, held[i], want[i])
		}
	}
}

func TestAnswersAreClassified(t *testing.T) {
	m := sinktest.Mapping("docker", "a", 8080, 1)
	tests := []struct {
		name   string
		remove bool
		answer func(string, hostswitch.Forward) (int, string)
		mark   error // the mark the error must carry, if any
		fails  bool
	}{
		{"server error is retried", false, func(string, hostswitch.Forward) (int, string) { return 500, "boom" }, nil, true},
		{"bind failure is retried", false, func(string, hostswitch.Forward) (int, string) {
			return 500, "listen tcp 127.0.0.1:8080: bind: address already in use"
		}, nil, true},
		{"bad request is permanent", false, func(string, hostswitch.Forward) (int, string) { return 400, "bad" }, core.ErrPermanent, true},
		{"unexpose of unknown is success", true, func(string, hostswitch.Forward) (int, string) { return 500, "proxy not found" }, nil, false},
		{"already running with same remote is held elsewhere", false, func(path string, _ hostswitch.Forward) (int, string) {
			if strings.HasSuffix(path, "/all") {
				return 200, `[{"local":"127.0.0.1:8080","remote":"192.168.127.2:8080","protocol":"tcp"}]`
			}
			return 500, "proxy already running"
		}, core.ErrHeldElsewhere, true},
		{"already running elsewhere is a conflict", false, func(path string, _ hostswitch.Forward) (int, string) {
			if strings.HasSuffix(path, "/all") {
				return 200, `[{"local":"127.0.0.1:8080","remote":"192.168.127.9:80","protocol":"tcp"}]`
			}
			return 500, "proxy already running"
		}, core.ErrConflict, true},
		{"garbage list is retried", false, func(path string, _ hostswitch.Forward) (int, string) {
			if strings.HasSuffix(path, "/all") {
				return 200, `<html>`
			}
			return 500, "proxy already running"
		}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, url := serve(t, tt.answer)
			err := newSink(t, url, 0).Send(context.Background(), core.Change{Remove: tt.remove, Mapping: m})
			if (err != nil) != tt.fails {
				t.Fatalf("err = %v, want failure %v", err, tt.fails)
			}
			for _, m := range []error{core.ErrPermanent, core.ErrHeldElsewhere, core.ErrConflict, core.ErrPeerDown} {
				if errors.Is(err, m) != (m == tt.mark) {
					t.Errorf("err = %v: marked %q is %v, want %v", err, m, errors.Is(err, m), m == tt.mark)
				}
			}
		})
	}
}

func TestUnreachableAndSlowPeers(t *testing.T) {
	s := newSink(t, "http://127.0.0.1:1", 0)
	err := s.Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 8080, 1)})
	if !errors.Is(err, core.ErrPeerDown) {
		t.Errorf("connection refused: err = %v, want ErrPeerDown", err)
	}

	// A peer that accepts and hangs up without answering.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	err = newSink(t, "http://"+ln.Addr().String(), 0).Send(context.Background(), core.Change{Mapping: sinktest.Mapping("d", "a", 8080, 1)})
	if !errors.Is(err, core.ErrPeerDown) {
		t.Errorf("closed connection: err = %v, want ErrPeerDown", err)
	}

	release := make(chan struct{})
	_, url := serve(t, func(string, hostswitch.Forward) (int, string) { <-release; return 200, "" })
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- newSink(t, url, 0).Send(ctx, core.Change{Mapping: sinktest.Mapping("d", "a", 8080, 1)})
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("a request that outlived its deadline reported success")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Send ignored its context's deadline")
	}
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []hostswitch.Config{{}, {BaseURL: hostswitch.DefaultBaseURL}, {GuestIP: hostswitch.DefaultGuestIP}} {
		if s, err := hostswitch.New(cfg); err != nil {
			t.Errorf("%+v (zero fields are the defaults) refused: %v", cfg, err)
		} else {
			s.Close()
		}
	}
	for _, cfg := range []hostswitch.Config{
		{BaseURL: "192.168.127.1", GuestIP: "192.168.127.2"},
		{BaseURL: "ftp://x", GuestIP: "192.168.127.2"},
		{BaseURL: hostswitch.DefaultBaseURL, GuestIP: "fd00::2"},
		{BaseURL: hostswitch.DefaultBaseURL, GuestIP: "guest"},
		{BaseURL: hostswitch.DefaultBaseURL, GuestIP: "192.168.127.2", CheckInterval: -time.Second},
		{BaseURL: hostswitch.DefaultBaseURL, GuestIP: "192.168.127.2", ProbeInterval: -time.Second},
		{BaseURL: hostswitch.DefaultBaseURL, GuestIP: "192.168.127.2", ProbeInterval: 10 * time.Second},
	} {
		if _, err := hostswitch.New(cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

// TestCloseReleasesConnections: once Send, List and WatchPeer (probe and
// full checks) have used connections to the API and returned, Close
// closes every one the sink kept open, at the server's end too, and no
// goroutine is left; a Sink that never sent anything closes as well.
func TestCloseReleasesConnections(t *testing.T) {
	var open, peak, lists atomic.Int64
	srv := httptest.NewUnstartedServer(&scripted{answer: func(path string, _ hostswitch.Forward) (int, string) {
		if path == "/services/forwarder/all" {
			// A list that reads differently each time (the same
			// forwards, spaced otherwise), so that each check asks
			// for a reconcile.
			return 200, "[]" + strings.Repeat(" ", int(lists.Add(1)%2))
		}
		return 200, ""
	}})
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			n := open.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	srv.Start()
	defer srv.Close()
	ignore := goleak.IgnoreCurrent()

	fresh, err := hostswitch.New(hostswitch.Config{BaseURL: srv.URL, GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.Close(); err != nil {
		t.Errorf("Close of a sink that never sent: %v", err)
	}

	s, err := hostswitch.New(hostswitch.Config{BaseURL: srv.URL, GuestIP: hostswitch.DefaultGuestIP, ProbeInterval: 10 * time.Millisecond, CheckInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m := sinktest.Mapping("docker", "c", 8080, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.List(context.Background()); err != nil {
		t.Fatal(err)
	}
	var checks atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.WatchPeer(ctx, func() { checks.Add(1) })
	}()
	testenv.Eventually(t, 10*time.Second, "full checks", func() (bool, string) {
		return checks.Load() >= 3, fmt.Sprintf("%d so far", checks.Load())
	})
	cancel()
	<-done
	// The requests' connection and the probe's were open together; a probe
	// in flight when WatchPeer ends takes its connection down with it, so
	// only the requests' one is sure to be open still.
	if p := peak.Load(); p < 2 {
		t.Fatalf("at most %d connections were open at once; want the requests' and the probe's", p)
	}
	if n := open.Load(); n < 1 {
		t.Fatalf("%d connections open before Close; want at least the requests' one", n)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	testenv.Eventually(t, 10*time.Second, "every connection closed", func() (bool, string) {
		n := open.Load()
		return n == 0, fmt.Sprintf("%d still open", n)
	})
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}
