package docker_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/moby/api/types/container"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/docker"
)

func load(t *testing.T, name string) container.InspectResponse {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "docker", name))
	if err != nil {
		t.Fatal(err)
	}
	var c container.InspectResponse
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func ports(m core.Mapping) string {
	var out []string
	for _, p := range m.Ports {
		out = append(out, p.String())
	}
	return strings.Join(out, " ")
}

// The fixtures are `docker inspect` output from dockerd 20.10 for the
// run flags named in their file names.
func TestConvertFixtures(t *testing.T) {
	tests := []struct {
		file, ports, loopback string
	}{
		{"inspect-pub.json", "0.0.0.0:8080->80/tcp [::]:8080->80/tcp", ""},
		{"inspect-lo.json", "127.0.0.1:8081->80/tcp", "tcp 8081 198.18.0.3:80"},
		{"inspect-udp.json", "0.0.0.0:8082->80/udp [::]:8082->80/udp", ""},
		{"inspect-range.json", "0.0.0.0:9000->80/tcp [::]:9000->80/tcp 0.0.0.0:9001->81/tcp [::]:9001->81/tcp 0.0.0.0:9002->82/tcp [::]:9002->82/tcp", ""},
		{"inspect-all.json", "0.0.0.0:32768->80/tcp [::]:32768->80/tcp", ""},
		{"inspect-none.json", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			c := load(t, tt.file)
			m, loopback, problems := docker.Convert(c)
			if len(problems) > 0 {
				t.Errorf("problems: %v", problems)
			}
			if m.ID != c.ID || m.Source != docker.Name {
				t.Errorf("key %v, want docker/%s", m.Key, c.ID)
			}
			if got := ports(m); got != tt.ports {
				t.Errorf("ports %q, want %q", got, tt.ports)
			}
			var lb []string
			for _, b := range loopback {
				lb = append(lb, fmt.Sprintf("%s %d %s", b.Protocol, b.HostPort, b.Backend))
			}
			if got := strings.Join(lb, ","); got != tt.loopback {
				t.Errorf("loopback %q, want %q", got, tt.loopback)
			}
		})
	}
}

func TestConvertSkipsBadBindings(t *testing.T) {
	c := load(t, "inspect-lo.json")
	var bad container.InspectResponse
	raw := `{"Id":"x","NetworkSettings":{"Ports":{
		"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"8081"},{"HostIp":"0.0.0.0","HostPort":""},{"HostIp":"0.0.0.0","HostPort":"99999"}],
		"81/tcp":null}}}`
	if err := json.Unmarshal([]byte(raw), &bad); err != nil {
		t.Fatal(err)
	}
	m, loopback, problems := docker.Convert(bad)
	if got := ports(m); got != "127.0.0.1:8081->80/tcp" {
		t.Errorf("ports %q", got)
	}
	if len(problems) != 2 {
		t.Errorf("problems %v, want the empty and the out-of-range host port", problems)
	}
	if len(loopback) != 0 {
		t.Errorf("no network, so no backend for loopback rules; got %v", loopback)
	}
	c.NetworkSettings = nil
	if m, _, _ := docker.Convert(c); len(m.Ports) != 0 {
		t.Error("a container without network settings has ports")
	}
}
