package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// scrapePorts is how many one-port mappings BenchmarkDeliveryWhileScraped
// delivers: every unprivileged port on 127.0.0.1.
const scrapePorts = 65536 - 1024

// BenchmarkDeliveryWhileScraped runs the agent in-process with the static
// source (a file of scrapePorts one-port mappings) and the stdout sink,
// and measures the time from the start of run to the sink's last line,
// with no client on the status address and with 4 clients asking for
// /metrics, or for /status, in a loop over keep-alive connections as fast
// as the agent answers them. It reports the delivery time and the
// scrapes served per second.
func BenchmarkDeliveryWhileScraped(b *testing.B) {
	file := filepath.Join(b.TempDir(), "static.json")
	var data strings.Builder
	data.WriteString(`{"mappings":[`)
	for i := range scrapePorts {
		if i > 0 {
			data.WriteByte(',')
		}
		fmt.Fprintf(&data, `{"id":"p%d","ports":[{"containerPort":80,"hostIP":"127.0.0.1","hostPort":%d}]}`, i, 1024+i)
	}
	data.WriteString(`]}`)
	if err := os.WriteFile(file, []byte(data.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		path    string
		loopers int
	}{
		{"idle", "", 0},
		{"metrics-loops=4", "/metrics", 4},
		{"status-loops=4", "/status", 4},
	} {
		b.Run(c.name, func(b *testing.B) {
			var delivery time.Duration
			var scrapes int64
			for b.Loop() {
				d, n := deliverWhileScraped(b, file, c.path, c.loopers)
				delivery += d
				scrapes += n
			}
			b.ReportMetric(delivery.Seconds()/float64(b.N), "s-delivery")
			b.ReportMetric(float64(scrapes)/delivery.Seconds(), "scrapes/s")
		})
	}
}

// lineCounter counts the lines written to it and closes done at the
// want-th.
type lineCounter struct {
	n    atomic.Int64
	want int64
	once sync.Once
	done chan struct{}
}

func (c *lineCounter) Write(p []byte) (int, error) {
	if c.n.Add(int64(bytes.Count(p, []byte{'\n'}))) >= c.want {
		c.once.Do(func() { close(c.done) })
	}
	return len(p), nil
}

// deliverWhileScraped runs one agent until the stdout sink printed every
// port of file, with loopers clients asking for path meanwhile; it
// returns the time that took and how many answers the clients read.
func deliverWhileScraped(b *testing.B, file, path string, loopers int) (time.Duration, int64) {
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(b))
	out := &lineCounter{want: scrapePorts, done: make(chan struct{})}
	var errOut syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var scrapes atomic.Int64
	var clients sync.WaitGroup
	defer clients.Wait()
	defer cancel()
	for range loopers {
		clients.Go(func() {
			client := &http.Client{Transport: &http.Transport{}}
			defer client.CloseIdleConnections()
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
				res, err := client.Do(req)
				if err != nil {
					time.Sleep(5 * time.Millisecond) // not listening yet
					continue
				}
				_, err = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if err == nil && res.StatusCode == http.StatusOK {
					scrapes.Add(1)
				}
			}
		})
	}
	done := make(chan int, 1)
	start := time.Now()
	go func() {
		done <- run(ctx, isolated(b, []string{"--sources=static", "--staticFile=" + file, "--sinks=stdout",
			"--unexposeOnExit=false", "--statusAddr=" + addr}), out, &errOut)
	}()
	select {
	case <-out.done:
	case code := <-done:
		b.Fatalf("the agent exited (%d) before delivering every port: %s", code, errOut.String())
	case <-time.After(3 * time.Minute):
		cancel()
		<-done
		b.Fatalf("%d of %d ports delivered after 3 minutes: %.2000s", out.n.Load(), scrapePorts, errOut.String())
	}
	took := time.Since(start)
	n := scrapes.Load()
	cancel()
	if code := <-done; code != 0 {
		b.Errorf("exit %d: %s", code, errOut.String())
	}
	return took, n
}
