package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// startAgent runs the agent in-process with args; the returned stop ends
// it and fails the test if it exited with an error. The test's cleanup
// stops it too.
func startAgent(t *testing.T, args ...string) (stop func()) {
	t.Helper()
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- run(ctx, args, &out, &errOut) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("agent exit %d: %s", code, errOut.String())
		}
	})
	t.Cleanup(stop)
	return stop
}

// controlSocketAnswers waits until `guestagent status` reads the agent's
// state over sock.
func controlSocketAnswers(t *testing.T, sock string) {
	t.Helper()
	c := newControlClient(sock)
	testenv.Eventually(t, 15*time.Second, "status over "+sock, func() (bool, string) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		st, err := c.status(ctx)
		return err == nil && len(st.Mappings) == 1, fmt.Sprint(err)
	})
}

// TestControlSocketKeepsItsDirectoryAsItIs runs the agent with its
// control socket in a shared sticky directory (1777, as /tmp), in an
// existing 0755 directory and in a missing one: the socket is 0600 and
// answers, an existing directory keeps its mode and sticky bit, a missing
// one is created 0700, nothing else is left in it, and the socket goes
// when the agent stops.
func TestControlSocketKeepsItsDirectoryAsItIs(t *testing.T) {
	for _, tt := range []struct {
		name string
		mode fs.FileMode // of the existing directory; 0: missing
		want fs.FileMode
	}{
		{"shared-sticky", fs.ModeSticky | 0o777, fs.ModeSticky | 0o777},
		{"existing-0755", 0o755, 0o755},
		{"missing", 0, 0o700},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run")
			if tt.mode != 0 {
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dir, tt.mode); err != nil {
					t.Fatal(err)
				}
			}
			sock := filepath.Join(dir, "ga.sock")
			stop := startAgent(t, "--sources=static", "--staticFile="+writeStatic(t), "--sinks=stdout",
				"--stateDir="+t.TempDir(), "--controlSocket="+sock)
			controlSocketAnswers(t, sock)
			fi, err := os.Lstat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
				t.Errorf("the control socket is %s, want a socket 0600", fi.Mode())
			}
			dirMode := func() fs.FileMode {
				di, err := os.Stat(dir)
				if err != nil {
					t.Fatal(err)
				}
				return di.Mode() & (fs.ModePerm | fs.ModeSticky)
			}
			if got := dirMode(); got != tt.want {
				t.Errorf("the directory is %s, want %s", got, tt.want)
			}
			if names := dirNames(t, dir); len(names) != 1 || names[0] != "ga.sock" {
				t.Errorf("the directory holds %q, want the socket alone", names)
			}
			stop()
			if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the socket is still there after the agent stopped: %v", err)
			}
			if got := dirMode(); got != tt.want {
				t.Errorf("after the agent stopped the directory is %s, want %s", got, tt.want)
			}
		})
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// TestControlSocketPathHoldingSomethingElse puts at the control socket's
// path a regular file, a directory, symbolic links (to a missing path, to
// a file, to a stale socket) and a socket another process answers on: the
// agent refuses to start, says why, and leaves each as it was. A stale
// socket (nobody answers) is replaced.
func TestControlSocketPathHoldingSomethingElse(t *testing.T) {
	staleSocket := func(t *testing.T, path string) {
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	}
	for _, tt := range []struct {
		name  string
		setup func(t *testing.T, path string) (check func(t *testing.T))
		want  string // in the error; empty: the agent starts
	}{
		{"regular-file", func(t *testing.T, path string) func(*testing.T) {
			writeFile(t, path, "keep me")
			return func(t *testing.T) { fileHolds(t, path, "keep me") }
		}, "exists and is not a socket"},
		{"directory", func(t *testing.T, path string) func(*testing.T) {
			if err := os.Mkdir(path, 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(path, "inside"), "keep me")
			return func(t *testing.T) { fileHolds(t, filepath.Join(path, "inside"), "keep me") }
		}, "exists and is not a socket"},
		{"symlink-to-missing", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "target.sock")
			symlink(t, target, path)
			return func(t *testing.T) {
				linksTo(t, path, target)
				if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("the link's target was created: %v", err)
				}
			}
		}, "symbolic link"},
		{"symlink-to-file", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "passwd")
			writeFile(t, target, "root:x:0:0")
			symlink(t, target, path)
			return func(t *testing.T) { linksTo(t, path, target); fileHolds(t, target, "root:x:0:0") }
		}, "symbolic link"},
		{"symlink-to-stale-socket", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "s")
			staleSocket(t, target)
			symlink(t, target, path)
			return func(t *testing.T) {
				linksTo(t, path, target)
				if fi, err := os.Lstat(target); err != nil || fi.Mode().Type() != fs.ModeSocket {
					t.Errorf("the link's target changed: %v %v", fi, err)
				}
			}
		}, "symbolic link"},
		{"live-socket", func(t *testing.T, path string) func(*testing.T) {
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			return func(t *testing.T) {
				c, err := net.Dial("unix", path)
				if err != nil {
					t.Errorf("the other process's socket no longer answers: %v", err)
					return
				}
				c.Close()
			}
		}, "another agent is running"},
		{"stale-socket", func(t *testing.T, path string) func(*testing.T) {
			staleSocket(t, path)
			return func(t *testing.T) {}
		}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ga.sock")
			check := tt.setup(t, path)
			args := []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--stateDir=" + t.TempDir(), "--controlSocket=" + path}
			if tt.want == "" {
				startAgent(t, args...)
				controlSocketAnswers(t, path)
				check(t)
				return
			}
			var out, errOut syncBuffer
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if code := run(ctx, args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), tt.want) {
				t.Errorf("exit %d, %q; want 2 and %q", code, errOut.String(), tt.want)
			}
			check(t)
			if names := dirNames(t, dir); len(names) != 1 {
				t.Errorf("the directory holds %q, want what the test put there alone", names)
			}
		})
	}
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func fileHolds(t *testing.T, path, want string) {
	t.Helper()
	if b, err := os.ReadFile(path); err != nil || string(b) != want {
		t.Errorf("%s holds %q (%v), want %q", path, b, err, want)
	}
}

func symlink(t *testing.T, target, path string) {
	t.Helper()
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

func linksTo(t *testing.T, path, target string) {
	t.Helper()
	if got, err := os.Readlink(path); err != nil || got != target {
		t.Errorf("%s links to %q (%v), want %q", path, got, err, target)
	}
}
