package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/internal/testenv"
)

// logLines parses the agent's JSON log lines.
func logLines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var lines []map[string]any
	for l := range strings.Lines(out) {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		lines = append(lines, m)
	}
	return lines
}

// TestRepeatedLogLinesAreSummed logs 500 lines of one message with
// different fields, 3 of another and 50 at debug level: the first
// logBurst of the first message are written, the rest summed up in one
// line that counts them, and the others are all written.
func TestRepeatedLogLinesAreSummed(t *testing.T) {
	var out syncBuffer
	log, limiter := newLogger(true, &out)
	for i := range 500 {
		log.Warn("port not exposed: not supported by this sink", zap.Int("port", i))
	}
	for i := range 3 {
		log.Info("ownership record read", zap.Int("ports", i))
	}
	for i := range 50 {
		log.Debug("detail", zap.Int("i", i))
	}
	limiter.Stop()
	count := map[string]int{}
	var summary map[string]any
	for _, l := range logLines(t, out.String()) {
		count[l["msg"].(string)]++
		if l["msg"] == "repeated log lines suppressed" {
			summary = l
		}
	}
	if count["port not exposed: not supported by this sink"] != logBurst || count["ownership record read"] != 3 || count["detail"] != 50 {
		t.Errorf("lines written: %v", count)
	}
	if summary == nil || summary["message"] != "port not exposed: not supported by this sink" || summary["suppressed"] != float64(500-logBurst) || summary["level"] != "warn" {
		t.Errorf("summary %v, want one counting %d lines", summary, 500-logBurst)
	}
}

// TestLogFloodIsBounded churns 500 IPv6-only ports, which host-switch
// cannot take, five times through a running agent: each arrival is a
// warning, 2,500 without the limit. The log holds at most logBurst of
// them per interval, and a summary that counts the others.
func TestLogFloodIsBounded(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "static.json")
	write := func(n int) {
		var ports []string
		for i := range n {
			ports = append(ports, fmt.Sprintf(`{"protocol":"tcp","containerPort":80,"hostIP":"2001:db8::1","hostPort":%d}`, 20000+i))
		}
		data := `{"mappings":[{"id":"six","ports":[` + strings.Join(ports, ",") + `]}]}`
		tmp := file + ".tmp"
		if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, file); err != nil {
			t.Fatal(err)
		}
	}
	write(0)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	var out, errOut syncBuffer
	start := time.Now()
	go func() {
		done <- run(ctx, isolated(t, []string{"--sources=static", "--staticFile=" + file, "--staticPollInterval=50ms",
			"--sinks=host-switch", "--hostSwitchURL=http://127.0.0.1:1"}), &out, &errOut)
	}()
	const msg = "port not exposed: not supported by this sink"
	for range 5 {
		write(500)
		testenv.Eventually(t, 10*time.Second, "the ports to arrive", func() (bool, string) {
			return strings.Contains(errOut.String(), msg), ""
		})
		time.Sleep(200 * time.Millisecond) // let the source see this round
		write(0)
		time.Sleep(200 * time.Millisecond)
	}
	cancel()
	<-done
	elapsed := time.Since(start)
	warned, suppressed := 0, 0.0
	for _, l := range logLines(t, errOut.String()) {
		switch {
		case l["msg"] == msg:
			warned++
		case l["msg"] == "repeated log lines suppressed" && l["message"] == msg:
			suppressed += l["suppressed"].(float64)
		}
	}
	intervals := int(elapsed/logInterval) + 1
	if warned > logBurst*intervals {
		t.Errorf("%d warnings in %v, over %d per %v", warned, elapsed.Round(time.Millisecond), logBurst, logInterval)
	}
	if warned+int(suppressed) < 500 {
		t.Errorf("%d warnings and %v suppressed: the summaries do not count the lines left out", warned, suppressed)
	}
	t.Logf("%d warnings written, %v summed up, %d bytes of log in %v", warned, suppressed, len(errOut.String()), elapsed.Round(time.Millisecond))
}
