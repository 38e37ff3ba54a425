package containerd_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/containerd"
)

func fixture(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "containerd", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func render(ports []core.Port) string {
	var out []string
	for _, p := range ports {
		out = append(out, p.String())
	}
	return strings.Join(out, " ")
}

func TestPortsFromLabel(t *testing.T) {
	huge := "[" + strings.Repeat(`{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"},`, 20000) + `{"HostPort":1,"ContainerPort":1}]`
	tests := []struct {
		name    string
		label   string
		ports   string
		skipped int
		err     string
	}{
		{name: "valid", label: fixture(t, "ports-valid.json"), ports: "0.0.0.0:8090->80/tcp 127.0.0.1:8091->53/udp"},
		{name: "empty", label: fixture(t, "ports-empty.json")},
		{name: "garbage", label: fixture(t, "ports-garbage.json"), err: "not a JSON list"},
		{name: "not a list", label: `{"HostPort":80}`, err: "not a JSON list"},
		{name: "out of range", label: fixture(t, "ports-out-of-range.json"), ports: "0.0.0.0:8095->80/tcp", skipped: 4},
		{name: "huge", label: huge, err: "more than"},
		{name: "default protocol and no host IP", label: `[{"HostPort":8080,"ContainerPort":80}]`, ports: "0.0.0.0:8080->80/tcp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ports, skipped, err := containerd.NerdctlPorts(containerd.DefaultNerdctlDataRoot, map[string]string{containerd.LabelPorts: tt.label})
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := render(ports); got != tt.ports {
				t.Errorf("ports %q, want %q", got, tt.ports)
			}
			if len(skipped) != tt.skipped {
				t.Errorf("skipped %v, want %d", skipped, tt.skipped)
			}
		})
	}
}

func TestNetworkConfigWinsOverLabel(t *testing.T) {
	root := t.TempDir()
	dir := stateDir(t, root, "default", "c1")
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte(fixture(t, "network-config.json")), 0o644); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{containerd.LabelStateDir: dir, containerd.LabelPorts: fixture(t, "ports-valid.json")}
	ports, _, err := containerd.NerdctlPorts(root, labels)
	if err != nil || render(ports) != "0.0.0.0:8090->80/tcp" {
		t.Errorf("ports %q, %v; want the file's", render(ports), err)
	}
	// A state directory without the file (nerdctl < 2.2) falls back to the
	// label.
	labels[containerd.LabelStateDir] = stateDir(t, root, "default", "c2")
	ports, _, err = containerd.NerdctlPorts(root, labels)
	if err != nil || len(ports) != 2 {
		t.Errorf("fallback to the label: %q, %v", render(ports), err)
	}
	// A broken file is an error, not silently the label.
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	labels[containerd.LabelStateDir] = dir
	if _, _, err := containerd.NerdctlPorts(root, labels); err == nil || errors.Is(err, containerd.ErrRefused) {
		t.Errorf("broken network-config.json: %v, want a parse error", err)
	}
}

// stateDir makes the state directory nerdctl would make for container id
// of namespace ns under the data root root.
func stateDir(t testing.TB, root, ns, id string) string {
	t.Helper()
	dir := filepath.Join(root, "0123abcd", "containers", ns, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestCRIContainersNerdctlLabelsAreRefused pins the rule for containers
// made by containerd's CRI plugin: their nerdctl labels, which may be an
// image's LABELs, are never used, whatever their kind; other containers'
// are.
func TestCRIContainersNerdctlLabelsAreRefused(t *testing.T) {
	root := t.TempDir()
	dir := stateDir(t, root, "k8s.io", "pod")
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte(fixture(t, "network-config.json")), 0o644); err != nil {
		t.Fatal(err)
	}
	ports := fixture(t, "ports-valid.json")
	for _, tt := range []struct {
		name    string
		labels  map[string]string
		ports   string
		refused bool
	}{
		{"CRI container with a ports label", map[string]string{containerd.LabelCRIKind: "container", containerd.LabelPorts: ports}, "", true},
		{"CRI sandbox with a state directory", map[string]string{containerd.LabelCRIKind: "sandbox", containerd.LabelStateDir: dir}, "", true},
		{"CRI marker of any value", map[string]string{containerd.LabelCRIKind: "", containerd.LabelPorts: ports}, "", true},
		{"CRI container without nerdctl labels", map[string]string{containerd.LabelCRIKind: "container", "io.kubernetes.pod.name": "web"}, "", false},
		{"CRI container with empty nerdctl labels", map[string]string{containerd.LabelCRIKind: "container", containerd.LabelPorts: " ", containerd.LabelStateDir: ""}, "", false},
		{"nerdctl container with a ports label", map[string]string{containerd.LabelPorts: ports}, "0.0.0.0:8090->80/tcp 127.0.0.1:8091->53/udp", false},
		{"nerdctl container with a state directory", map[string]string{containerd.LabelStateDir: dir}, "0.0.0.0:8090->80/tcp", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := containerd.NerdctlPorts(root, tt.labels)
			if tt.refused != errors.Is(err, containerd.ErrRefused) || (!tt.refused && err != nil) {
				t.Fatalf("err = %v, want refused %v", err, tt.refused)
			}
			if tt.refused && !strings.Contains(err.Error(), containerd.LabelCRIKind) {
				t.Errorf("the refusal does not name CRI's label: %v", err)
			}
			if render(got) != tt.ports {
				t.Errorf("ports %q, want %q", render(got), tt.ports)
			}
		})
	}
}

func TestNetworksLabel(t *testing.T) {
	nets, err := containerd.Networks(map[string]string{containerd.LabelNetworks: `["bridge","other"]`})
	if err != nil || fmt.Sprint(nets) != "[bridge other]" {
		t.Errorf("%v, %v", nets, err)
	}
	if _, err := containerd.Networks(map[string]string{containerd.LabelNetworks: `bridge`}); err == nil {
		t.Error("garbage accepted")
	}
}
