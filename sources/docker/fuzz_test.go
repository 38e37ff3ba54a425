package docker_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/moby/api/types/container"

	"github.com/guestagent/guestagent/sources/docker"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// FuzzConvert decodes arbitrary `docker inspect` JSON and converts its port
// data: no panic, and every port and loopback binding returned is valid.
func FuzzConvert(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "testdata", "docker", "*.json"))
	for _, name := range files {
		if data, err := os.ReadFile(name); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte(`{"Id":"x","NetworkSettings":{"Ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"99999"}],"x/y":null}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var c container.InspectResponse
		if json.Unmarshal(data, &c) != nil {
			return
		}
		m, loopback, _ := docker.Convert(c)
		for _, p := range m.Ports {
			if err := p.Validate(); err != nil {
				t.Fatalf("invalid port returned: %v", err)
			}
		}
		for _, b := range loopback {
			if !loopbacknat.Valid(b) {
				t.Fatalf("invalid loopback binding returned: %+v", b)
			}
		}
	})
}
