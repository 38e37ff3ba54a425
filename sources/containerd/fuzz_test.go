package containerd_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// FuzzStateDir feeds arbitrary nerdctl/state-dir labels to NerdctlPorts
// over a data root with a state directory in it: the ports of a
// network-config.json are only ever read from an absolute, clean path
// under the data root, and everything else is refused, never a panic.
func FuzzStateDir(f *testing.F) {
	root := f.TempDir()
	dir := filepath.Join(root, "0123abcd", "containers", "default", "c")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		f.Fatal(err)
	}
	cfg := `{"portMappings":[{"HostPort":8090,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"}]}`
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte(cfg), 0o600); err != nil {
		f.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.TempDir(), "network-config.json"), []byte(cfg), 0o600); err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{dir, dir + "/", dir + "/.", root + "/0123abcd//containers/default/c", root + "/../" + filepath.Base(root) + "/0123abcd/containers/default/c",
		"0123abcd/containers/default/c", "tmp", "", "/", root, root + "-x", "/dev/zero", dir + "\x00"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, stateDir string) {
		ports, _, err := containerd.NerdctlPorts(root, map[string]string{containerd.LabelStateDir: stateDir})
		if err != nil {
			if !errors.Is(err, containerd.ErrRefused) {
				t.Fatalf("%q: %v, not a refusal", stateDir, err)
			}
			return
		}
		if len(ports) > 0 && (filepath.Clean(stateDir) != stateDir || !strings.HasPrefix(stateDir, root+"/")) {
			t.Fatalf("ports read from %q, outside the data root %s", stateDir, root)
		}
	})
}
