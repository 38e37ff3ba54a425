package containerd

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cniutils "github.com/containernetworking/plugins/pkg/utils"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
)

// TestPortmapChainIsThePluginsName pins portmapChain to the name the CNI
// plugins' own code gives the portmap plugin's per-container chain.
func TestPortmapChainIsThePluginsName(t *testing.T) {
	for _, tt := range [][2]string{
		{"bridge", "default-0123456789abcdef"},
		{"k8s-pod-network", "k8s.io-3f1c2e"},
		{"", ""},
		{"a-very-long-network-name-that-goes-on", "some-namespace-with-a-long-container-id-too"},
	} {
		want := cniutils.MustFormatChainNameWithPrefix(tt[0], tt[1], "DN-")
		if got := portmapChain(tt[0], tt[1]); got != want {
			t.Errorf("portmapChain(%q, %q) = %q, want %q", tt[0], tt[1], got, want)
		}
	}
}

// TestStateDirIsReadSafely runs nerdctlPorts over state directories and
// network-config.json files that are not what nerdctl makes, with openat2
// and with the component-by-component walk used where it is missing: each
// is refused, promptly, and the container's ports label is not used in
// its stead; nerdctl's own layout is read.
func TestStateDirIsReadSafely(t *testing.T) {
	const good = `{"portMappings":[{"HostPort":8090,"ContainerPort":80,"Protocol":"tcp","HostIP":"0.0.0.0"}]}`
	const label = `[{"HostPort":9000,"ContainerPort":80}]`
	write := func(t *testing.T, path, data string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	symlink := func(t *testing.T, target, link string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(link), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
	}
	mkfifo := func(t *testing.T, path string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mkfifo(path, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		name string
		// setup makes what the test needs under the data root root (and
		// elsewhere, in other) and returns the state directory's label.
		setup func(t *testing.T, root, other string) string
		ports string // the ports when the state directory is used
		want  string // in the refusal; "" when the data is used
	}{
		{"nerdctl's layout", func(t *testing.T, root, _ string) string {
			dir := filepath.Join(root, "0123abcd/containers/default/c")
			write(t, filepath.Join(dir, networkConfigFile), good)
			return dir
		}, "0.0.0.0:8090->80/tcp", ""},
		{"no file: the label", func(t *testing.T, root, _ string) string {
			dir := filepath.Join(root, "0123abcd/containers/default/c")
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			return dir
		}, "0.0.0.0:9000->80/tcp", ""},
		{"exactly the limit", func(t *testing.T, root, _ string) string {
			dir := filepath.Join(root, "d")
			write(t, filepath.Join(dir, networkConfigFile), good+strings.Repeat(" ", maxPortData-len(good)))
			return dir
		}, "0.0.0.0:8090->80/tcp", ""},
		{"relative", func(*testing.T, string, string) string { return "tmp" }, "", "not an absolute path"},
		{"dot-dot", func(t *testing.T, root, other string) string {
			write(t, filepath.Join(other, networkConfigFile), good)
			rel, err := filepath.Rel(root, other)
			if err != nil {
				t.Fatal(err)
			}
			return root + "/" + rel
		}, "", "not a clean path"},
		{"trailing slash", func(t *testing.T, root, _ string) string {
			write(t, filepath.Join(root, "d", networkConfigFile), good)
			return root + "/d/"
		}, "", "not a clean path"},
		{"outside the data root", func(t *testing.T, _, other string) string {
			write(t, filepath.Join(other, networkConfigFile), good)
			return other
		}, "", "not under nerdctl's data root"},
		{"a sibling of the data root", func(t *testing.T, root, _ string) string {
			write(t, filepath.Join(root+"-x", networkConfigFile), good)
			t.Cleanup(func() { os.RemoveAll(root + "-x") })
			return root + "-x"
		}, "", "not under nerdctl's data root"},
		{"the data root itself", func(t *testing.T, root, _ string) string {
			write(t, filepath.Join(root, networkConfigFile), good)
			return root
		}, "", "not under nerdctl's data root"},
		{"no state directory", func(_ *testing.T, root, _ string) string {
			return filepath.Join(root, "gone")
		}, "", "no such file"},
		{"symlinked file", func(t *testing.T, root, other string) string {
			write(t, filepath.Join(other, networkConfigFile), good)
			symlink(t, filepath.Join(other, networkConfigFile), filepath.Join(root, "d", networkConfigFile))
			return filepath.Join(root, "d")
		}, "", "symbolic link"},
		{"symlink to /dev/zero", func(t *testing.T, root, _ string) string {
			symlink(t, "/dev/zero", filepath.Join(root, "d", networkConfigFile))
			return filepath.Join(root, "d")
		}, "", "symbolic link"},
		{"symlinked state directory", func(t *testing.T, root, other string) string {
			write(t, filepath.Join(other, networkConfigFile), good)
			symlink(t, other, filepath.Join(root, "0123abcd/containers/default/c"))
			return filepath.Join(root, "0123abcd/containers/default/c")
		}, "", "symbolic link"},
		{"symlinked parent", func(t *testing.T, root, other string) string {
			write(t, filepath.Join(other, "containers/default/c", networkConfigFile), good)
			symlink(t, other, filepath.Join(root, "0123abcd"))
			return filepath.Join(root, "0123abcd/containers/default/c")
		}, "", "symbolic link"},
		{"relative symlink within the data root", func(t *testing.T, root, _ string) string {
			write(t, filepath.Join(root, "real", networkConfigFile), good)
			symlink(t, "real", filepath.Join(root, "d"))
			return filepath.Join(root, "d")
		}, "", "symbolic link"},
		{"FIFO", func(t *testing.T, root, _ string) string {
			mkfifo(t, filepath.Join(root, "d", networkConfigFile))
			return filepath.Join(root, "d")
		}, "", "not a regular file"},
		{"FIFO as the state directory", func(t *testing.T, root, _ string) string {
			mkfifo(t, filepath.Join(root, "d"))
			return filepath.Join(root, "d")
		}, "", "not a directory"},
		{"device node", func(t *testing.T, root, _ string) string {
			path := filepath.Join(root, "d", networkConfigFile)
			if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mknod(path, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 5))); err != nil {
				t.Skipf("mknod: %v", err)
			}
			return filepath.Join(root, "d")
		}, "", "not a regular file"},
		{"a directory", func(t *testing.T, root, _ string) string {
			if err := os.MkdirAll(filepath.Join(root, "d", networkConfigFile), 0o700); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(root, "d")
		}, "", "not a regular file"},
		{"over the limit", func(t *testing.T, root, _ string) string {
			write(t, filepath.Join(root, "d", networkConfigFile), good+strings.Repeat(" ", maxPortData+1-len(good)))
			return filepath.Join(root, "d")
		}, "", "more than"},
	} {
		for name, open := range map[string]dirOpener{"openat2": openBeneath2, "walk": openBeneathWalk} {
			t.Run(tt.name+"/"+name, func(t *testing.T) {
				root, other := t.TempDir(), t.TempDir()
				labels := map[string]string{LabelStateDir: tt.setup(t, root, other), LabelPorts: label}
				type result struct {
					ports []core.Port
					err   error
				}
				done := make(chan result, 1)
				go func() {
					ports, _, err := nerdctlPorts(root, labels, open)
					done <- result{ports, err}
				}()
				var r result
				select {
				case r = <-done:
				case <-time.After(30 * time.Second):
					t.Fatal("reading the state directory blocks")
				}
				if tt.want == "" {
					if r.err != nil {
						t.Fatal(r.err)
					}
				} else if !errors.Is(r.err, ErrRefused) || !strings.Contains(r.err.Error(), tt.want) {
					t.Fatalf("err = %v, want a refusal saying %q", r.err, tt.want)
				}
				var got []string
				for _, p := range r.ports {
					got = append(got, p.String())
				}
				if strings.Join(got, " ") != tt.ports {
					t.Errorf("ports %q, want %q", got, tt.ports)
				}
			})
		}
	}
}

// TestBadDataRootIsRefused: a data root that is not absolute and clean
// reads no state directory.
func TestBadDataRootIsRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, networkConfigFile), []byte(`{"portMappings":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, root := range []string{"", "var/lib/nerdctl", filepath.Dir(dir) + "/", filepath.Dir(dir) + "/./"} {
		_, _, err := NerdctlPorts(root, map[string]string{LabelStateDir: dir})
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "not an absolute, clean path") {
			t.Errorf("data root %q: err = %v, want a refusal", root, err)
		}
	}
}
