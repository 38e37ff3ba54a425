package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

// TestStatusAndMetrics runs the agent with --statusAddr and reads both
// views of its state.
func TestStatusAndMetrics(t *testing.T) {
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, isolated(t, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--statusAddr=" + addr}), &out, &errOut)
	}()
	defer func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("exit %d: %s", code, errOut.String())
		}
	}()
	client := &http.Client{Timeout: 5 * time.Second}
	get := func(path string) (string, bool) {
		res, err := client.Get("http://" + addr + path)
		if err != nil {
			return "", false
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return string(b), res.StatusCode == http.StatusOK
	}
	var st core.Status
	deadline := time.Now().Add(15 * time.Second)
	for {
		if body, ok := get("/status"); ok && json.Unmarshal([]byte(body), &st) == nil && len(st.Mappings) == 1 && len(st.Sinks) == 1 && st.Sinks[0].Delivered == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed the mapping: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(st.Refused) != 1 || st.Refused[0].Port.HostPort != 443 {
		t.Errorf("refused = %+v, want the privileged port", st.Refused)
	}
	if len(st.Ports) != 1 || len(st.Ports[0].Claims) != 1 || st.Ports[0].Claims[0].Key.Source != "static" ||
		len(st.Ports[0].Sinks) != 1 || st.Ports[0].Sinks[0].State != core.PortExposed {
		t.Errorf("ports = %+v, want the one port, claimed by the static source and exposed at stdout", st.Ports)
	}
	metrics, ok := get("/metrics")
	if !ok {
		t.Fatal("GET /metrics failed")
	}
	for _, want := range []string{
		`guestagent_mappings{source="static"} 1`,
		`guestagent_ports{source="static"} 1`,
		`guestagent_refused_ports 1`,
		`guestagent_sink_delivered_total{sink="stdout"} 1`,
		`guestagent_sink_peer_down{sink="stdout"} 0`,
		`guestagent_sink_ports{sink="stdout",state="exposed"} 1`,
		`guestagent_sink_ports{sink="stdout",state="retrying"} 0`,
		`guestagent_port_conflicts 0`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q:\n%s", want, metrics)
		}
	}
}
