package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

// countingProxy forwards the guest's requests to gvproxy's API and counts
// the expose requests gvproxy refused, and the distinct ones.
type countingProxy struct {
	refused atomic.Int64
	mu      sync.Mutex
	seen    map[string]bool // the bodies of refused requests
}

func (c *countingProxy) distinct() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

// statusRecorder notes the status a handler writes.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

func (c *countingProxy) start(t *testing.T, g *gvproxytest.Guest) string {
	t.Helper()
	c.seen = map[string]bool{}
	ln, err := g.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target, _ := url.Parse("http://" + gvproxytest.GatewayIP)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{DialContext: g.Dial, MaxIdleConnsPerHost: 16}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/expose") {
			rp.ServeHTTP(w, r)
			return
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		rp.ServeHTTP(rec, r)
		if rec.code >= 400 {
			c.refused.Add(1)
			c.mu.Lock()
			c.seen[string(body)] = true
			c.mu.Unlock()
		}
	})
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "http://" + ln.Addr().String()
}

// TestUnbindableSocketsCostABoundedRate opens 10,000 listeners in the
// guest with IP_FREEBIND on an address the host lacks: gvproxy cannot bind
// any of them and answers each expose with HTTP 500. Once the first
// attempts and the budget's burst are spent, their retries cost at most
// the budget's rate (20 a second) in all, a listener opened meanwhile is exposed and answers,
// and the log holds a bounded number of the refusals.
func TestUnbindableSocketsCostABoundedRate(t *testing.T) {
	testenv.Integration(t)
	if testing.Short() {
		t.Skip("starts gvproxy and 10,000 sockets")
	}
	const n, good = 10000, 7104
	if err := portsFree(good); err != nil {
		t.Fatalf("port %d must be free on this machine for gvproxy's forward: %v", good, err)
	}
	gv := gvproxytest.Start(t)
	g := gvproxytest.StartGuest(t, gv)
	var proxy countingProxy
	api := proxy.start(t, g)

	freebind := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_FREEBIND, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	err := g.In(func() error {
		for i := range n {
			ln, err := freebind.Listen(context.Background(), "tcp4", fmt.Sprintf("198.51.100.7:%d", 20000+i))
			if err != nil {
				return err
			}
			t.Cleanup(func() { ln.Close() })
		}
		return nil
	})
	if err != nil {
		t.Fatalf("opening the unbindable listeners: %v", err)
	}
	agent := startAgentIn(t, g, "--adminInstall", "--sources=sockets", "--sinks=host-switch", "--hostSwitchURL="+api)
	testenv.Eventually(t, 120*time.Second, "every unbindable port tried once", func() (bool, string) {
		if agent.exited() {
			t.Fatalf("the agent exited (%d)\n%s", agent.code, agent.logTail())
		}
		return proxy.distinct() >= n, fmt.Sprintf("%d of %d refused", proxy.distinct(), n)
	})

	// Past the budget's burst (200 at 20 a second): from here on the
	// retries run at the budget's rate.
	time.Sleep(12 * time.Second)
	start, before := time.Now(), proxy.refused.Load()
	cpuBefore := cpuTicks(t, agent.cmd.Process.Pid)
	serveIn(t, g, "tcp4", fmt.Sprintf("0.0.0.0:%d", good))
	waitForwards(t, gv, agent, "the good listener's forward", map[string]string{
		fmt.Sprintf("tcp 0.0.0.0:%d", good): fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, good),
	}, nil)
	exchange(t, "beside 10,000 unbindable ports: ", []byte("hello"), good)
	if d := time.Until(start.Add(10 * time.Second)); d > 0 {
		time.Sleep(d) // a window of retries to count
	}
	retries, elapsed := proxy.refused.Load()-before, time.Since(start)
	cpu := time.Duration(cpuTicks(t, agent.cmd.Process.Pid)-cpuBefore) * time.Second / userHZ
	// 20 a second, and a second's worth in flight when the window opened.
	// Without the budget, every port is retried every 8 s at the most:
	// over 10,000.
	if limit := int64(20*elapsed.Seconds() + 20 + 20); retries > limit {
		t.Errorf("%d refused retries in %v, over the budget's %d", retries, elapsed.Round(time.Millisecond), limit)
	}
	t.Logf("%d refused retries in %v (%.1f/s); agent CPU %v (%.1f%% of a core)", retries, elapsed.Round(time.Millisecond),
		float64(retries)/elapsed.Seconds(), cpu, 100*cpu.Seconds()/elapsed.Seconds())
	if code := agent.stop(); code != 0 {
		t.Fatalf("agent exited with %d on SIGTERM\n%s", code, agent.logTail())
	}
	logged := strings.Count(fileTail(agent.log, 1<<20), "peer refused a port")
	if logged > 10*(int(elapsed/logInterval)+2) {
		t.Errorf("%d log lines of refused ports", logged)
	}
}
