package hostswitch_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// FuzzSyncAnswer serves arbitrary bytes as the API's list of forwards and
// runs Sync against it: no panic, and the only forwards it unexposes are
// listed ones that are its own (to the guest address on the same port).
func FuzzSyncAnswer(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "hostswitch", "all.json")); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`[{"local":"[::1]:80","remote":"192.168.127.2:80"},{"local":"x","remote":"192.168.127.2:"},null]`))
	var (
		mu     sync.Mutex
		answer []byte
		api    *scripted
	)
	api = &scripted{answer: func(path string, _ hostswitch.Forward) (int, string) {
		mu.Lock()
		defer mu.Unlock()
		if strings.HasSuffix(path, "/all") {
			return http.StatusOK, string(answer)
		}
		return http.StatusOK, ""
	}}
	srv := httptest.NewServer(api)
	defer srv.Close()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: srv.URL, GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()
	desired := []core.Mapping{{Key: core.Key{Source: "fuzz", ID: "a"}, Ports: []core.Port{port(core.TCP, "127.0.0.1", 8080)}}}

	f.Fuzz(func(t *testing.T, data []byte) {
		mu.Lock()
		answer = data
		api.requests = nil
		mu.Unlock()
		if err := s.Sync(context.Background(), desired); err != nil {
			return
		}
		listed, err := hostswitch.DecodeForwards(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("Sync accepted a list that does not decode: %v", err)
		}
		for _, req := range api.log() {
			path, body, _ := strings.Cut(req, " ")
			if !strings.HasSuffix(path, "/unexpose") {
				continue
			}
			if !ownListed(listed, body) {
				t.Fatalf("unexposed %s, which is not a listed forward of this agent's", body)
			}
		}
	})
}

// ownListed reports whether the unexpose request body names a listed
// forward to the guest address on its own port.
func ownListed(listed []hostswitch.Forward, body string) bool {
	var req hostswitch.Forward
	if json.Unmarshal([]byte(body), &req) != nil {
		return false
	}
	for _, f := range listed {
		_, p, err := net.SplitHostPort(f.Local)
		if err == nil && f.Remote == net.JoinHostPort(hostswitch.DefaultGuestIP, p) &&
			f.Local == req.Local && f.Protocol == req.Protocol {
			return true
		}
	}
	return false
}
