// Package testenv finds the real engines and peers that the test set-up
// (make test) installs and starts, for integration tests. Under make test
// and in CI a missing engine fails the test with a clear message; in a bare
// `go test` run it skips with the same message.
package testenv

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// RequireEnv is set to 1 by make test: a missing engine then fails tests.
const RequireEnv = "GUESTAGENT_REQUIRE_ENGINES"

// Required reports whether missing engines fail tests rather than skip them.
func Required() bool {
	return os.Getenv(RequireEnv) == "1" || os.Getenv("CI") == "true"
}

// Integration skips t under `go test -short` (make check): the test needs a
// real engine or peer, root, a network namespace or a program it builds.
// Every helper here that provides one of those calls it, so a test that
// uses them need not; a test that needs them otherwise calls it first.
func Integration(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs real engines or privileges; skipped with -short")
	}
}

// Missing fails or skips t because what is not available.
func Missing(t testing.TB, what string) {
	t.Helper()
	msg := what + " is not available; `make test` installs and starts it"
	if Required() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Binary returns the path of a program named by the environment variable
// envVar, or found as name on PATH.
func Binary(t testing.TB, envVar, name string) string {
	t.Helper()
	Integration(t)
	if p := os.Getenv(envVar); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		Missing(t, name+" ("+envVar+"="+p+" does not exist)")
	}
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name+" (set "+envVar+" or put it on PATH)")
	}
	return p
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

var nsCounter atomic.Int64

// Eventually polls cond every 20ms until it holds, failing t with what
// (and what cond last said, when it returns a description) after timeout.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s still waiting for %s: %s", timeout, what, detail)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// WantError fails t unless err matches want: nil when want is "",
// otherwise an error whose text contains want.
func WantError(t testing.TB, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("rejected: %v", err)
	case want != "" && err == nil:
		t.Fatalf("accepted; want an error with %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("error %q does not say %q", err, want)
	}
}

// SyncBuffer is a bytes.Buffer that a process's or an agent's writers and
// the test may use at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// RunTestInChild runs the test named test of this test binary in a child
// process, with env added to its environment (a fixture the test runs
// only then), and returns the child's verbose output and whether it
// passed.
func RunTestInChild(t testing.TB, test string, env ...string) (string, bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("running %s in a child: %v", test, err)
	}
	return string(out), err == nil
}

// WantLines fails t unless out contains every string of want, and then
// logs out.
func WantLines(t testing.TB, out string, want ...string) {
	t.Helper()
	failed := false
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q", w)
			failed = true
		}
	}
	if failed {
		t.Logf("output:\n%s", out)
	}
}
