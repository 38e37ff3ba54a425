package containerd_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/guestagent/guestagent/sources/containerd"
)

// FuzzPortData feeds arbitrary label values and network-config.json
// contents to the parsers: no panic, and every port they return is valid.
func FuzzPortData(f *testing.F) {
	for _, name := range []string{"ports-valid.json", "ports-empty.json", "ports-garbage.json", "ports-out-of-range.json", "network-config.json"} {
		if data, err := os.ReadFile(filepath.Join("..", "..", "testdata", "containerd", name)); err == nil {
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, parse := range []func([]byte) ([]portLike, error){entries, networkConfig} {
			ports, err := parse(data)
			if err != nil {
				continue
			}
			for _, p := range ports {
				if err := p.Validate(); err != nil {
					t.Fatalf("returned an invalid port: %v", err)
				}
			}
		}
	})
}

type portLike interface{ Validate() error }

func entries(data []byte) ([]portLike, error) {
	ports, _, err := containerd.ParseEntries(data)
	out := make([]portLike, len(ports))
	for i := range ports {
		out[i] = ports[i]
	}
	return out, err
}

func networkConfig(data []byte) ([]portLike, error) {
	ports, _, err := containerd.ParseNetworkConfig(data)
	out := make([]portLike, len(ports))
	for i := range ports {
		out[i] = ports[i]
	}
	return out, err
}
