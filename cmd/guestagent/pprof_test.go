package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// TestProfilesOnlyWithPprof runs the agent with --statusAddr, with and
// without --pprof, and reads its heap profile: served with the flag, 404
// without it; --pprof without --statusAddr is refused.
func TestProfilesOnlyWithPprof(t *testing.T) {
	if code, _, errOut := runCLI(t, "--sources=static", "--sinks=stdout", "--pprof"); code != 2 || !strings.Contains(errOut, "--pprof needs --statusAddr") {
		t.Errorf("--pprof alone: exit %d, %q", code, errOut)
	}
	for _, pprof := range []bool{true, false} {
		t.Run(fmt.Sprint("pprof=", pprof), func(t *testing.T) {
			addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
			var out, errOut syncBuffer
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan int, 1)
			go func() {
				done <- run(ctx, isolated(t, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout",
					"--statusAddr=" + addr, fmt.Sprint("--pprof=", pprof)}), &out, &errOut)
			}()
			defer func() {
				cancel()
				if code := <-done; code != 0 {
					t.Errorf("exit %d: %s", code, errOut.String())
				}
			}()
			client := &http.Client{Timeout: 5 * time.Second}
			var res *http.Response
			var err error
			for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if res, err = client.Get("http://" + addr + "/debug/pprof/heap?debug=1"); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the status address never answered: %v", err)
				}
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if !pprof {
				if res.StatusCode != http.StatusNotFound {
					t.Errorf("without --pprof: %s, want 404", res.Status)
				}
				return
			}
			if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "heap profile:") || !strings.Contains(string(body), "# HeapInuse = ") {
				t.Errorf("heap profile: %s\n%.300s", res.Status, body)
			}
			if res, err := client.Get("http://" + addr + "/status"); err != nil || res.StatusCode != http.StatusOK {
				t.Errorf("GET /status beside the profiles: %v %v", res, err)
			} else {
				res.Body.Close()
			}
		})
	}
}
