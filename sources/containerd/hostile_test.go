package containerd_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/containerd"
)

// TestHostileLabelsAndStateDirs runs, in the real containerd, containers
// whose nerdctl port data must not be used next to ones whose must: in
// k8s.io, a container and a sandbox carrying CRI's marker with nerdctl's
// port labels (as an image's LABELs become under CRI) and a container
// nerdctl made there; in default, containers whose network-config.json is
// a FIFO (one listed at the start, one seen by its event) or whose state
// directory is relative. The nerdctl containers are reported, and so is a
// container started after all the others, which shows that none of them
// stalled the source. Each refused container is logged once, at warn
// level, naming it and why, however many events it has.
func TestHostileLabelsAndStateDirs(t *testing.T) {
	c := requireEngine(t)
	root := t.TempDir()
	n := seq.Add(1)
	name := func(what string) string { return uniqueID(fmt.Sprintf("%s-%d", what, n)) }
	port := func(p int) map[string]string {
		return portsLabel(containerd.PortEntry{HostPort: p, ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"})
	}
	fifoDir := func(ns, id string) string {
		dir := filepath.Join(root, "0123abcd", "containers", ns, id)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mkfifo(filepath.Join(dir, "network-config.json"), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	goodDir := func(ns, id string, p int) string {
		dir := filepath.Join(root, "0123abcd", "containers", ns, id)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		data := fmt.Sprintf(`{"portMappings":[{"HostPort":%d,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"}]}`, p)
		if err := os.WriteFile(filepath.Join(dir, "network-config.json"), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	type ctr struct {
		ns, id string
		labels map[string]string
		why    string // in the warning when refused; "" when reported
	}
	criCtr, criPod, nerdK8s := name("cri"), name("cri-pod"), name("nerdctl-k8s")
	fifo, relative, fifoLater, later := name("fifo"), name("relative"), name("fifo-later"), name("later")
	before := []ctr{
		{"k8s.io", criCtr, withLabel(port(22801), containerd.LabelCRIKind, "container"), "made by containerd's CRI plugin"},
		{"k8s.io", criPod, map[string]string{containerd.LabelCRIKind: "sandbox", containerd.LabelStateDir: goodDir("k8s.io", criPod, 22802)},
			"made by containerd's CRI plugin"},
		{"k8s.io", nerdK8s, map[string]string{containerd.LabelStateDir: goodDir("k8s.io", nerdK8s, 22803)}, ""},
		{"default", fifo, withLabel(port(22804), containerd.LabelStateDir, fifoDir("default", fifo)), "not a regular file"},
		{"default", relative, withLabel(port(22805), containerd.LabelStateDir, "tmp"), "not an absolute path"},
	}
	after := []ctr{
		{"default", fifoLater, withLabel(port(22806), containerd.LabelStateDir, fifoDir("default", fifoLater)), "not a regular file"},
		{"default", later, port(22807), ""},
	}
	run := func(cs []ctr) {
		for _, x := range cs {
			if err := c.RunContainer(x.ns, x.id, x.labels, ""); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.RemoveContainer(x.ns, x.id) })
		}
	}
	run(before)
	obs, logs := observer.New(zapcore.WarnLevel)
	s, err := containerd.New(containerd.Config{Socket: c.Socket, NerdctlDataRoot: root, Log: zap.New(obs),
		Backoff: core.Backoff{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	r := sourcetest.Start(t, containerd.Name, s)
	want := func(ids ...string) func() (bool, string) {
		return func() (bool, string) {
			got := reported(r)
			for _, id := range ids {
				if got[id] == "" {
					return false, fmt.Sprint(got)
				}
			}
			return true, ""
		}
	}
	testenv.Eventually(t, 30*time.Second, "the nerdctl container in k8s.io listed", want(containerd.ID("k8s.io", nerdK8s)))
	run(after)
	testenv.Eventually(t, 30*time.Second, "the container started last reported", want(containerd.ID("default", later)))

	// Events are handled in order: those of every container above were
	// handled before the last one's. Updates with nothing changed make
	// more events for the refused ones, and a change of the last one's
	// port shows when they have been handled too.
	for _, x := range append(before, after...) {
		if x.why != "" {
			if err := c.SetLabels(x.ns, x.id, x.labels); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := c.SetLabels("default", later, port(22808)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the last container's new port", func() (bool, string) {
		got := reported(r)[containerd.ID("default", later)]
		return got == "0.0.0.0:22808->80/tcp", got
	})

	got := reported(r)
	wantPorts := map[string]string{
		containerd.ID("k8s.io", nerdK8s): "0.0.0.0:22803->80/tcp",
		containerd.ID("default", later):  "0.0.0.0:22808->80/tcp",
	}
	for _, x := range append(before, after...) {
		key := containerd.ID(x.ns, x.id)
		if got[key] != wantPorts[key] {
			t.Errorf("%s reported with %q, want %q", key, got[key], wantPorts[key])
		}
		warned := logs.FilterField(zap.String("container", key)).FilterMessage("container's port data refused; container reported without ports")
		switch {
		case x.why == "" && warned.Len() != 0:
			t.Errorf("%s refused: %v", key, warned.All())
		case x.why != "" && warned.Len() != 1:
			t.Errorf("%s: %d refusals logged, want 1: %v", key, warned.Len(), warned.All())
		case x.why != "":
			entry := warned.All()[0]
			if entry.Level != zapcore.WarnLevel || !strings.Contains(fmt.Sprint(entry.ContextMap()["error"]), x.why) {
				t.Errorf("%s: logged %s %v, want a warning saying %q", key, entry.Level, entry.ContextMap(), x.why)
			}
		}
	}
}

// withLabel returns labels with key set to value.
func withLabel(labels map[string]string, key, value string) map[string]string {
	labels[key] = value
	return labels
}

// reported maps the ids of the mappings r wants to their ports.
func reported(r *core.Router) map[string]string {
	out := map[string]string{}
	for _, m := range r.Desired() {
		var ports []string
		for _, p := range m.Ports {
			ports = append(ports, p.String())
		}
		out[m.ID] = strings.Join(ports, " ")
	}
	return out
}
