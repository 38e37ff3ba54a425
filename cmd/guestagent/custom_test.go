package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// repoRoot is the module's root directory, where the Makefile is.
func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// TestBuildWithSomePlugins builds the agent with `make build PLUGINS=...`
// and checks that it holds those plugins (and the sinks the modes name)
// and nothing else, that asking for a source it lacks is an error naming
// what it has, that Rancher Desktop's enable flags of the sources left out
// are still taken as false, and that a bad plugin path is refused; the
// tree is left as it was.
func TestBuildWithSomePlugins(t *testing.T) {
	testenv.Integration(t)
	if _, err := exec.LookPath("make"); err != nil {
		testenv.Missing(t, "make")
	}
	root, bin := repoRoot(t), t.TempDir()
	makeBuild := func(plugins string) (string, error) {
		cmd := exec.Command("make", "--no-print-directory", "build", "BIN="+bin, "PLUGINS="+plugins)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := makeBuild("sources/docker sinks/stdout"); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	agent := filepath.Join(bin, "guestagent")
	help, err := exec.Command(agent, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("--help: %v\n%s", err, help)
	}
	var groups []string
	for _, l := range strings.Split(string(help), "\n") {
		if strings.HasPrefix(l, "source ") || strings.HasPrefix(l, "sink ") {
			groups = append(groups, strings.SplitN(l, ":", 2)[0])
		}
	}
	want := []string{`source "docker"`, `sink "host-switch"`, `sink "stdout"`, `sink "vtunnel"`, `sink "wsl-proxy"`}
	if strings.Join(groups, ", ") != strings.Join(want, ", ") {
		t.Errorf("plugins in --help: %v, want %v", groups, want)
	}
	if strings.Contains(string(help), "--kubeconfig") {
		t.Error("--help shows a flag of a plugin left out")
	}

	for _, flag := range []string{"kubernetes", "sockets"} {
		out, err := exec.Command(agent, "--docker", "--"+flag).CombinedOutput()
		if err == nil || !strings.Contains(string(out), `no source named "`+flag+`" in this build (have: docker)`) {
			t.Errorf("--%s: %v, %s", flag, err, out)
		}
	}

	// In network-tunnel mode the sockets source is on by default; this build
	// has none, so the agent runs with Docker alone, taking the flags
	// Rancher Desktop passes for the sources left out.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	run := exec.CommandContext(ctx, agent, "--adminInstall", "--docker", "--kubernetes=false", "--containerd=false", "--iptables=false",
		"--dockerHost=unix://"+filepath.Join(bin, "none.sock"),
		"--dockerLoopbackNAT=false", "--hostSwitchURL=http://127.0.0.1:1", "--stateDir=", "--controlSocket=")
	var log testenv.SyncBuffer
	run.Stdout, run.Stderr = &log, &log
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 20*time.Second, "the configuration line", func() (bool, string) {
		return strings.Contains(log.String(), `"sources":["docker"]`), log.String()
	})
	_ = run.Process.Signal(os.Interrupt)
	_ = run.Wait()

	if out, err := makeBuild("sources/nosuch"); err == nil || !strings.Contains(out, "no plugin package sources/nosuch") {
		t.Errorf("a bad plugin path: %v\n%s", err, out)
	}
	if st, err := exec.Command("git", "-C", root, "status", "--porcelain", "cmd/guestagent").Output(); err == nil && strings.Contains(string(st), "plugins_custom") {
		t.Errorf("the build left a file in the tree: %s", st)
	}
}
