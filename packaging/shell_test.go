package packaging_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/internal/testenv"
)

// The files under test, relative to this package.
const (
	initScript    = "openrc/init.d/guestagent"
	confFile      = "openrc/conf.d/guestagent"
	logrotateFile = "logrotate/guestagent"
)

// A posixShell runs the service script's functions as OpenRC would: /bin/sh
// of this machine (dash on Debian) and busybox ash, /bin/sh of the Alpine
// distribution image.
type posixShell struct {
	name string
	argv []string
	// installed is true for a shell the test set-up installs (make
	// engines), which go test -short leaves out.
	installed bool
}

// shells returns the shells to test with. busybox missing fails or skips
// (as testenv.Missing decides) only the tests that run with it; under go
// test -short they skip.
func shells() []posixShell {
	return []posixShell{
		{name: "sh", argv: []string{"/bin/sh"}},
		{name: "busybox-ash", argv: []string{"busybox", "ash"}, installed: true},
	}
}

// each runs test once per shell in a subtest named for the shell.
func each(t *testing.T, test func(t *testing.T, sh posixShell)) {
	t.Helper()
	for _, sh := range shells() {
		t.Run(sh.name, func(t *testing.T) {
			if sh.installed {
				testenv.Integration(t)
			}
			if _, err := exec.LookPath(sh.argv[0]); err != nil {
				testenv.Missing(t, sh.argv[0])
			}
			test(t, sh)
		})
	}
}

// run runs script with sh, from a file (the scripts of the cross-product
// test are too long for an argument), and returns its output and whether
// it exited with 0.
func (sh posixShell) run(t *testing.T, script string) (stdout, stderr string, ok bool) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "script.sh")
	if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	cmd := exec.Command(sh.argv[0], append(sh.argv[1:], path)...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if _, exited := err.(*exec.ExitError); err != nil && !exited {
		t.Fatalf("%s: %v", sh.name, err)
	}
	return out.String(), errOut.String(), err == nil
}

// quote returns s as one single-quoted shell word.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// absPath returns the absolute path of a file of this package.
func absPath(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(rel)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// lines splits s into its lines; "" has none.
func lines(s string) []string {
	s = strings.TrimSuffix(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}
