package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/stdout"
	"github.com/guestagent/guestagent/sinks/vtunnel"
	"github.com/guestagent/guestagent/sinks/wslproxy"
	"github.com/guestagent/guestagent/wire"
)

// syncBuffer is a bytes.Buffer safe for the agent's writers and the test.
type syncBuffer = testenv.SyncBuffer

// isolated adds a state directory and a control socket of the test's own
// to args, so that tests never share (or leave) ownership records and
// sockets.
func isolated(t testing.TB, args []string) []string {
	return append(slices.Clone(args), "--stateDir="+t.TempDir(), "--controlSocket="+controlSocket(t))
}

// controlSocket returns a control socket path of the test's own, short
// enough for a unix socket.
func controlSocket(t testing.TB) string {
	dir, err := os.MkdirTemp("", "ga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "guestagent.sock")
}

func TestTapInterfaceIPSetsEveryGuestAddress(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	cfg := defineFlags(fs)
	b, err := registry.Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse(longFlags(fs, []string{"-tap-interface-ip=192.168.127.9", "--dockerNATGuestIP=192.168.127.7"})); err != nil {
		t.Fatal(err)
	}
	if err := applyGuestIP(fs, b, cfg.tapIP); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"hostSwitchGuestIP":    "192.168.127.9",
		"containerdNATGuestIP": "192.168.127.9",
		"socketsRelayAddr":     "192.168.127.9",
		"dockerNATGuestIP":     "192.168.127.7", // given on its own: kept
	} {
		if got := fs.Lookup(name).Value.String(); got != want {
			t.Errorf("--%s = %s, want %s", name, got, want)
		}
	}
	// Set for it, the relay's address still counts as not given: the
	// sockets source relays it in network-tunnel mode only.
	if fs.Changed("socketsRelayAddr") {
		t.Error("--tap-interface-ip marked --socketsRelayAddr as given")
	}
}

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut syncBuffer
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if len(args) == 0 || !isCommand(args[0]) {
		args = isolated(t, args)
	}
	code := run(ctx, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestRancherDesktopFlagsAndDefaults checks every Rancher Desktop-compatible
// flag, the command's own and those its plugins define, with Rancher
// Desktop's defaults.
func TestRancherDesktopFlagsAndDefaults(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	defineFlags(fs)
	if _, err := registry.Bind(fs); err != nil {
		t.Fatal(err)
	}
	for name, def := range map[string]string{
		"containerdSock":         "/run/k3s/containerd/containerd.sock",
		"kubeconfig":             "/etc/rancher/k3s/k3s.yaml",
		"vtunnelAddr":            "127.0.0.1:3040",
		"wslProxySocket":         "/run/wsl-proxy.sock",
		"hostSwitchURL":          "http://192.168.127.1:80",
		"debug":                  "false",
		"docker":                 "false",
		"containerd":             "false",
		"kubernetes":             "false",
		"iptables":               "true",
		"k8sServiceListenerAddr": "127.0.0.1",
		"k8sAPIPort":             "6443",
		"adminInstall":           "false",
		"privilegedService":      "false",
		"version":                "false",
		"sinks":                  "[auto]",
	} {
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("flag --%s missing", name)
			continue
		}
		if f.DefValue != def {
			t.Errorf("--%s defaults to %q, want %q", name, f.DefValue, def)
		}
		if f.Usage == "" {
			t.Errorf("--%s has no help text", name)
		}
	}
}

func TestHelpIsGroupedByPlugin(t *testing.T) {
	code, out, _ := runCLI(t, "--help")
	if code != 0 {
		t.Fatalf("--help exit code %d", code)
	}
	for _, want := range []string{"General:", "Commands", "explain", "Networking mode:", `source "static"`, "--staticFile", `sink "stdout"`, "-name"} {
		if !strings.Contains(out, want) {
			t.Errorf("--help output lacks %q", want)
		}
	}
	if code, out, _ := runCLI(t, "-help"); code != 0 || !strings.Contains(out, "General:") {
		t.Errorf("-help (single dash) exit %d", code)
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI(t, "-version")
	if code != 0 || !strings.HasPrefix(out, "guestagent ") {
		t.Errorf("exit %d, output %q", code, out)
	}
}

func TestBadConfigurationIsRejected(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--sources=static", "--k8sServiceListenerAddr=192.168.1.5"}, "valid options are 0.0.0.0 and 127.0.0.1"},
		{[]string{"--sources=static", "--k8sServiceListenerAddr=localhost"}, "valid options are 0.0.0.0 and 127.0.0.1"},
		{[]string{"--sources=static", "--adminInstall", "--privilegedService"}, "use one of them"},
		{[]string{"--sources=static", "--k8sAPIPort=70000"}, "out of range"},
		{[]string{"--sources=nosuch", "--sinks=stdout"}, `no source named "nosuch"`},
		{[]string{"--sources=static", "--sinks=nosuch"}, `no sink named "nosuch"`},
		{[]string{"--sinks=stdout"}, "no source enabled"},
		{[]string{"--sources=static", "--sinks="}, "no sink selected"},
		{[]string{"--nosuchflag"}, "unknown flag"},
		{[]string{"--sources=static", "extra"}, "unexpected arguments"},
		{[]string{"--sources=static", "--staticPollInterval=0s", "--sinks=stdout"}, "must be positive"},
		{[]string{"--sources=static", "--sinks=stdout", "--statusAddr=nonsense"}, "--statusAddr"},
		{[]string{"--sources=static", "--sinks=stdout", "--statusAddr=0.0.0.0:9901"}, "not a loopback address"},
		{[]string{"--sources=static", "--sinks=stdout", "--tap-interface-ip=fd00::2"}, "--tap-interface-ip"},
		{[]string{"status", "extra"}, "unexpected arguments"},
		{[]string{"explain"}, "want one PORT"},
		{[]string{"explain", "http"}, "want PORT[/tcp|udp]"},
		{[]string{"explain", "80/icmp"}, "unknown protocol"},
		{[]string{"status", "-o", "yaml"}, `-o "yaml": want one of table, wide, json`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, _, errOut := runCLI(t, tt.args...)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if !strings.Contains(errOut, tt.want) {
				t.Errorf("stderr %q lacks %q", errOut, tt.want)
			}
		})
	}
}

func TestSingleDashLongFlags(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	cfg := defineFlags(fs)
	if err := fs.Parse(longFlags(fs, []string{"-adminInstall", "-k8sAPIPort=7443", "-k8sServiceListenerAddr", "0.0.0.0", "--", "-debug"})); err != nil {
		t.Fatal(err)
	}
	if !cfg.adminInstall || cfg.k8sAPIPort != 7443 || cfg.k8sListener != "0.0.0.0" || cfg.debug {
		t.Errorf("parsed %+v", cfg)
	}
	if fs.Arg(0) != "-debug" {
		t.Errorf("arguments after -- must stay as they are, got %v", fs.Args())
	}
}

func writeStatic(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "static.json")
	data := `{"mappings":[{"id":"web","ports":[
		{"protocol":"tcp","containerPort":80,"hostIP":"0.0.0.0","hostPort":8080},
		{"protocol":"tcp","containerPort":443,"hostIP":"0.0.0.0","hostPort":443}]}]}`
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func parseLines(t *testing.T, out string) []stdout.Line {
	t.Helper()
	var lines []stdout.Line
	for l := range strings.Lines(out) {
		var line stdout.Line
		if err := json.Unmarshal([]byte(l), &line); err != nil {
			t.Fatalf("stdout line %q: %v", l, err)
		}
		lines = append(lines, line)
	}
	return lines
}

// TestRunEndToEnd runs the agent in non-admin mode with the static source
// and the stdout sink, then stops it: the port moves to localhost, the
// privileged one is refused, and shutdown removes what was added.
func TestRunEndToEnd(t *testing.T) {
	path := writeStatic(t)
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, isolated(t, []string{"--sources=static", "--staticFile=" + path, "--sinks=stdout"}), &out, &errOut)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "\n") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	lines := parseLines(t, out.String())
	if len(lines) != 2 || lines[0].Remove || !lines[1].Remove {
		t.Fatalf("want an add then a remove on shutdown, got %+v", lines)
	}
	ports, err := wire.ParsePorts(lines[0].Ports)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 1 || ports[0].HostIP.String() != "127.0.0.1" || ports[0].HostPort != 8080 {
		t.Errorf("non-admin mode delivered %v, want only 127.0.0.1:8080", ports)
	}
	if !strings.Contains(errOut.String(), "privileged") {
		t.Errorf("refused privileged port was not logged: %s", errOut.String())
	}
}

// defaultBound binds the plugins of this build to a flag set of their own.
func defaultBound(t *testing.T) *registry.Bound {
	t.Helper()
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	defineFlags(fs)
	b, err := registry.Bind(fs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestK8sAPIMappingOnlyForWSLProxy(t *testing.T) {
	b := defaultBound(t)
	if acceptFor(b, hostswitch.Name)(core.Key{Source: k8sAPISource}) || acceptFor(b, vtunnel.Name)(core.Key{Source: k8sAPISource}) {
		t.Error("host-exposing sinks must not get the Kubernetes API mapping")
	}
	if !acceptFor(b, hostswitch.Name)(core.Key{Source: "docker"}) {
		t.Error("host-switch must get other mappings")
	}
	if acceptFor(b, wslproxy.Name) != nil {
		t.Error("wsl-proxy must get everything")
	}
	r := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- k8sAPIMapping(7443).Run(ctx, r.Emitter(k8sAPISource)) }()
	deadline := time.Now().Add(5 * time.Second)
	for len(r.Desired()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	d := r.Desired()
	if len(d) != 1 || len(d[0].Ports) != 1 || d[0].Ports[0].HostPort != 7443 || d[0].Ports[0].HostIP.String() != "127.0.0.1" {
		t.Errorf("desired = %+v, want 127.0.0.1:7443", d)
	}
}

// TestSignalShutdown builds the binary and stops it with SIGTERM.
func TestSignalShutdown(t *testing.T) {
	testenv.Integration(t)
	bin := filepath.Join(t.TempDir(), "guestagent")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			var out, errOut syncBuffer
			cmd := exec.Command(bin, "-sources=static", "-staticFile="+writeStatic(t), "-sinks=stdout", "-debug", "-stateDir="+t.TempDir(), "-controlSocket="+controlSocket(t))
			cmd.Stdout, cmd.Stderr = &out, &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(out.String(), "\n") && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			waited := make(chan error, 1)
			go func() { waited <- cmd.Wait() }()
			select {
			case err := <-waited:
				if err != nil {
					t.Fatalf("exit: %v\n%s", err, errOut.String())
				}
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatal("agent did not stop after the signal")
			}
			lines := parseLines(t, out.String())
			if len(lines) != 2 || !lines[1].Remove {
				t.Errorf("want add and remove, got %+v", lines)
			}
			if !strings.Contains(errOut.String(), `"level":"debug"`) {
				t.Error("--debug produced no debug log lines")
			}
		})
	}
}

func TestModeSinks(t *testing.T) {
	b := defaultBound(t)
	for _, tt := range []struct {
		mode core.Mode
		wsl  bool
		want []string
	}{
		{core.ModeLocal, true, []string{hostswitch.Name, wslproxy.Name}},
		{core.ModeLocal, false, []string{hostswitch.Name}},
		{core.ModeTunnel, true, []string{hostswitch.Name, wslproxy.Name}},
		{core.ModePrivileged, true, []string{vtunnel.Name}},
	} {
		if got := b.AutoSinks(registry.Options{Mode: tt.mode, WSLIntegration: tt.wsl}); !slices.Equal(got, tt.want) {
			t.Errorf("auto sinks in %v (WSL integration %v) = %v, want %v", tt.mode, tt.wsl, got, tt.want)
		}
	}
}
