package packaging_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/internal/testenv"
)

// TestDistBuildsStaticBinaries runs `make dist` into a temporary directory
// and checks what it built: a static, stripped ELF for each platform, the
// checksums in SHA256SUMS, and the version set at link time, printed by
// the binary of this machine's architecture.
func TestDistBuildsStaticBinaries(t *testing.T) {
	testenv.Integration(t) // builds the agent for two platforms
	mk := testenv.Binary(t, "GUESTAGENT_MAKE", "make")
	fileCmd := testenv.Binary(t, "GUESTAGENT_FILE", "file")
	testenv.Binary(t, "GUESTAGENT_SHA256SUM", "sha256sum")

	dir := t.TempDir()
	const version = "v9.8.7-packaging-test"
	cmd := exec.Command(mk, "-C", "..", "dist", "DIST="+dir, "VERSION="+version)
	cmd.Env = append(os.Environ(), "MAKEFLAGS=", "MAKELEVEL=") // not an enclosing make's settings
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make dist: %v\n%s", err, out)
	}

	platforms := []struct {
		arch, elf string // GOARCH, and the machine as file(1) names it
	}{
		{"amd64", "x86-64"},
		{"arm64", "ARM aarch64"},
	}
	sums := map[string]string{}
	for _, line := range lines(readFile(filepath.Join(dir, "SHA256SUMS"))) {
		sum, name, ok := strings.Cut(line, "  ")
		if !ok {
			t.Fatalf("SHA256SUMS: malformed line %q", line)
		}
		sums[name] = sum
	}
	if len(sums) != len(platforms) {
		t.Errorf("SHA256SUMS lists %d files, want %d: %v", len(sums), len(platforms), sums)
	}
	for _, p := range platforms {
		t.Run(p.arch, func(t *testing.T) {
			name := "guestagent-linux-" + p.arch
			bin := filepath.Join(dir, name)
			b, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			if sum := sha256.Sum256(b); sums[name] != hex.EncodeToString(sum[:]) {
				t.Errorf("SHA256SUMS has %q for %s, want %x", sums[name], name, sum)
			}

			out, err := exec.Command(fileCmd, "-b", bin).Output()
			if err != nil {
				t.Fatalf("file %s: %v", bin, err)
			}
			desc := string(out)
			for _, want := range []string{"ELF 64-bit LSB executable", p.elf, "statically linked", "stripped"} {
				if !strings.Contains(desc, want) {
					t.Errorf("file says %q, want it to say %q", desc, want)
				}
			}
			for _, bad := range []string{"dynamically linked", "interpreter", "not stripped"} {
				if strings.Contains(desc, bad) {
					t.Errorf("file says %q: %s", desc, bad)
				}
			}

			if p.arch != runtime.GOARCH {
				return // not runnable here
			}
			out, err = exec.Command(bin, "--version").CombinedOutput()
			if err != nil {
				t.Fatalf("%s --version: %v\n%s", name, err, out)
			}
			if got, want := strings.TrimSpace(string(out)), "guestagent "+version; got != want {
				t.Errorf("%s --version = %q, want %q", name, got, want)
			}
		})
	}
}
