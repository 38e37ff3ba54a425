package hostswitch_test

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/guestagent/guestagent/sinks/hostswitch"
)

// FuzzListAnswer serves arbitrary bytes as the API's list of forwards:
// List never panics, fails when the answer is not a list of forwards, and
// says an entry matches only when it leads to the guest's same port, the
// only forwards the router may take for this agent's.
func FuzzListAnswer(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "hostswitch", "all.json")); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`[{"local":"[::1]:80","remote":"192.168.127.2:80"},{"local":"x","remote":"192.168.127.2:"},null]`))
	var (
		mu     sync.Mutex
		answer []byte
	)
	srv := httptest.NewServer(&scripted{answer: func(string, hostswitch.Forward) (int, string) {
		mu.Lock()
		defer mu.Unlock()
		return http.StatusOK, string(answer)
	}})
	defer srv.Close()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: srv.URL, GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		f.Fatal(err)
	}
	defer s.Close()

	f.Fuzz(func(t *testing.T, data []byte) {
		mu.Lock()
		answer = data
		mu.Unlock()
		held, err := s.List(context.Background())
		listed, decodeErr := hostswitch.DecodeForwards(bytes.NewReader(data))
		if (err != nil) != (decodeErr != nil) {
			t.Fatalf("List err = %v, but decoding the answer gives %v", err, decodeErr)
		}
		if err != nil {
			return
		}
		if len(held) > len(listed) {
			t.Fatalf("List returned %d entries from %d forwards", len(held), len(listed))
		}
		for _, h := range held {
			if h.Port.HostPort == 0 || h.Port.Validate() == nil && h.Port.ContainerPort != 0 {
				t.Fatalf("entry with a bad port: %+v", h)
			}
			if h.Matches && h.Target != net.JoinHostPort(hostswitch.DefaultGuestIP, strconv.Itoa(int(h.Port.HostPort))) {
				t.Fatalf("entry %+v matches but leads elsewhere", h)
			}
			if h.Matches && s.Supports(h.Port) != nil {
				t.Fatalf("entry %+v matches but the sink cannot make it", h)
			}
		}
	})
}
