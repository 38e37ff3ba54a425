package static_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/static"
)

// fileBackend keeps the file's entries and rewrites it atomically.
type fileBackend struct {
	path    string
	entries []static.Entry
	bases   map[string]uint16
}

func (b *fileBackend) write(t *testing.T) {
	t.Helper()
	data, err := json.MarshalIndent(static.File{Mappings: b.entries}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	tmp := b.path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, b.path); err != nil {
		t.Fatal(err)
	}
}

func (b *fileBackend) ports(name string, variant int) []core.Port {
	if variant == sourcetest.NoPorts {
		return nil
	}
	base, ok := b.bases[name]
	if !ok {
		base = 42000 + uint16(len(b.bases))*10
		b.bases[name] = base
	}
	hp := base + uint16(variant)*2
	return []core.Port{
		{Protocol: core.TCP, ContainerPort: 80, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: hp},
		{Protocol: core.UDP, ContainerPort: 53, HostIP: netip.MustParseAddr("::1"), HostPort: hp + 1},
	}
}

func (b *fileBackend) set(t *testing.T, name string, variant int) core.Mapping {
	e := static.Entry{ID: name, Ports: b.ports(name, variant), ConnectAddrs: []core.ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}}}
	b.entries = slices.DeleteFunc(b.entries, func(x static.Entry) bool { return x.ID == name })
	b.entries = append(b.entries, e)
	b.write(t)
	return core.Mapping{Key: core.Key{ID: name}, Ports: e.Ports, ConnectAddrs: e.ConnectAddrs}
}

func TestContract(t *testing.T) {
	b := &fileBackend{path: filepath.Join(t.TempDir(), "static.json"), bases: map[string]uint16{}}
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source {
			return newSource(t, static.Config{File: b.path, PollInterval: time.Second})
		},
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			return b.set(t, name, variant)
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			b.entries = slices.DeleteFunc(b.entries, func(x static.Entry) bool { return x.ID == m.ID })
			b.write(t)
		},
		Update: func(t *testing.T, m core.Mapping, variant int) core.Mapping {
			return b.set(t, m.ID, variant)
		},
		Repeat: func(t *testing.T, _ core.Mapping) { b.write(t) },
		Outage: func(t *testing.T, during func()) {
			if err := os.Remove(b.path); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
			during()
		},
	})
}

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    int
		wantErr string
	}{
		{"empty list", `{"mappings":[]}`, 0, ""},
		{"defaults to tcp", `{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostPort":8080}]}]}`, 1, ""},
		{"upper-case protocol", `{"mappings":[{"id":"a","ports":[{"protocol":"UDP","containerPort":53,"hostPort":5353}]}]}`, 1, ""},
		{"demo fixture", mustRead(t, "../../testdata/static/demo.json"), 2, ""},
		{"not JSON", `mappings: []`, 0, "decoding"},
		{"trailing data", `{"mappings":[]} {}`, 0, "trailing"},
		{"unknown field", `{"mappings":[],"extra":1}`, 0, "unknown field"},
		{"missing id", `{"mappings":[{"ports":[]}]}`, 0, "id is empty"},
		{"duplicate id", `{"mappings":[{"id":"a"},{"id":"a"}]}`, 0, "used twice"},
		{"bad protocol", `{"mappings":[{"id":"a","ports":[{"protocol":"icmp","containerPort":1,"hostPort":1}]}]}`, 0, "unknown protocol"},
		{"port out of range", `{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostPort":70000}]}]}`, 0, "decoding"},
		{"host port zero", `{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostPort":0}]}]}`, 0, "host port must be"},
		{"bad host IP", `{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostIP":"localhost","hostPort":80}]}]}`, 0, "decoding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := static.Parse([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if len(got) != tt.want {
				t.Fatalf("got %d mappings, want %d", len(got), tt.want)
			}
			for _, m := range got {
				for _, p := range m.Ports {
					if p.Protocol == "" {
						t.Errorf("port %v has no protocol after parsing", p)
					}
				}
			}
		})
	}
}

func mustRead(t *testing.T, path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestBadContentKeepsState checks that a broken rewrite leaves the last good
// mappings in place and that a later fix is picked up.
func TestBadContentKeepsState(t *testing.T) {
	path := filepath.Join(t.TempDir(), "static.json")
	good := `{"mappings":[{"id":"a","ports":[{"containerPort":80,"hostPort":8080}]}]}`
	if err := os.WriteFile(path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	r := core.NewRouter(core.RouterConfig{})
	out := r.Emitter(static.Name)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	src := newSource(t, static.Config{File: path, PollInterval: 50 * time.Millisecond})
	go func() { done <- src.Run(ctx, out) }()
	defer func() { cancel(); <-done }()

	waitIDs(t, r, "a")
	if err := os.WriteFile(path, []byte(`{"mappings":[{"id":"b",`), 0o644); err != nil {
		t.Fatal(err)
	}
	// Let several polls read the broken file; "a" must survive them all.
	time.Sleep(300 * time.Millisecond)
	waitIDs(t, r, "a")
	fixed := `{"mappings":[{"id":"b","ports":[{"containerPort":80,"hostPort":8081}]}]}`
	if err := os.WriteFile(path, []byte(fixed), 0o644); err != nil {
		t.Fatal(err)
	}
	waitIDs(t, r, "b")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitIDs(t, r)
}

func waitIDs(t *testing.T, r *core.Router, ids ...string) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, fmt.Sprintf("desired ids %v", ids), func() (bool, string) {
		var got []string
		for _, m := range r.Desired() {
			got = append(got, m.ID)
		}
		return slices.Equal(got, ids), fmt.Sprintf("desired ids %v", got)
	})
}

func newSource(t *testing.T, cfg static.Config) *static.Source {
	t.Helper()
	s, err := static.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestNewRejectsANegativeInterval checks New's error names the flag and
// the value.
func TestNewRejectsANegativeInterval(t *testing.T) {
	tests := []struct {
		name    string
		cfg     static.Config
		wantErr string
	}{
		{"negative interval", static.Config{File: "x.json", PollInterval: -time.Second}, "--staticPollInterval must be positive, got -1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := static.New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New(%+v) = %v, want an error mentioning %q", tt.cfg, err, tt.wantErr)
			}
		})
	}
	if _, err := static.New(static.Config{File: "x.json", PollInterval: time.Second}); err != nil {
		t.Fatalf("New with a file and an interval: %v", err)
	}
}
