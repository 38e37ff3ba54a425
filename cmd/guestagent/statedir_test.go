package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// TestUnusableStateDirKeepsTheAgentServing runs the agent with a state
// directory it cannot make, and with one every user may write to: it
// serves its ports with its records in memory, says so once, and leaves
// the directory as it was.
func TestUnusableStateDirKeepsTheAgentServing(t *testing.T) {
	cases := map[string]func(t *testing.T) string{
		"cannot be made": func(t *testing.T) string {
			file := filepath.Join(t.TempDir(), "file")
			if err := os.WriteFile(file, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(file, "state")
		},
		"shared": func(t *testing.T) string {
			dir := filepath.Join(t.TempDir(), "shared")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, 0o777|os.ModeSticky); err != nil {
				t.Fatal(err)
			}
			return dir
		},
	}
	for name, stateDir := range cases {
		t.Run(name, func(t *testing.T) {
			dir := stateDir(t)
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan int, 1)
			var out, errOut syncBuffer
			go func() {
				done <- run(ctx, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout",
					"--stateDir=" + dir, "--controlSocket=" + controlSocket(t)}, &out, &errOut)
			}()
			testenv.Eventually(t, 10*time.Second, "port 8080 delivered", func() (bool, string) {
				return strings.Contains(out.String(), `"HostPort":"8080"`), out.String()
			})
			cancel()
			if code := <-done; code != 0 {
				t.Errorf("exit %d\n%s", code, errOut.String())
			}
			if n := strings.Count(errOut.String(), "ownership records kept in memory only"); n != 1 {
				t.Errorf("said %d times that the records stay in memory, want once:\n%s", n, errOut.String())
			}
			if fi, err := os.Stat(dir); err == nil {
				if fi.Mode()&(os.ModePerm|os.ModeSticky) != 0o777|os.ModeSticky {
					t.Errorf("the shared directory's mode is now %v", fi.Mode())
				}
				if ents, _ := os.ReadDir(dir); len(ents) != 0 {
					t.Errorf("the agent wrote into the directory it does not trust: %v", ents)
				}
			}
		})
	}
}
