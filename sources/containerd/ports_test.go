package containerd_test

import (
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
			ports, skipped, err := containerd.PortsFromLabels(map[string]string{containerd.LabelPorts: tt.label})
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
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte(fixture(t, "network-config.json")), 0o644); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{containerd.LabelStateDir: dir, containerd.LabelPorts: fixture(t, "ports-valid.json")}
	ports, _, err := containerd.PortsFromLabels(labels)
	if err != nil || render(ports) != "0.0.0.0:8090->80/tcp" {
		t.Errorf("ports %q, %v; want the file's", render(ports), err)
	}
	// A state directory without the file falls back to the label.
	labels[containerd.LabelStateDir] = t.TempDir()
	ports, _, err = containerd.PortsFromLabels(labels)
	if err != nil || len(ports) != 2 {
		t.Errorf("fallback to the label: %q, %v", render(ports), err)
	}
	// A broken file is an error, not silently the label.
	if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	labels[containerd.LabelStateDir] = dir
	if _, _, err := containerd.PortsFromLabels(labels); err == nil {
		t.Error("broken network-config.json accepted")
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
