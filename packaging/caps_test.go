package packaging_test

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/internal/testenv"
)

// capNames are Linux's capabilities by number, as capabilities(7) names
// them without "cap_".
var capNames = []string{
	"chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill",
	"setgid", "setuid", "setpcap", "linux_immutable", "net_bind_service",
	"net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
	"sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
	"sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
	"sys_tty_config", "mknod", "lease", "audit_write", "audit_control",
	"setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
	"block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
}

// agentCaps are the capabilities the service keeps by default, in their
// order by number.
var agentCaps = []string{
	"dac_read_search", "net_bind_service", "net_admin", "net_raw",
	"sys_ptrace", "sys_admin", "perfmon", "bpf",
}

// capSet decodes a capability mask of /proc/<pid>/status into names,
// "cap_N" for a number without one.
func capSet(t *testing.T, hex string) []string {
	t.Helper()
	mask, err := strconv.ParseUint(hex, 16, 64)
	if err != nil {
		t.Fatalf("capability mask %q: %v", hex, err)
	}
	var out []string
	for n := range 64 {
		if mask&(1<<n) == 0 {
			continue
		}
		if n < len(capNames) {
			out = append(out, capNames[n])
		} else {
			out = append(out, fmt.Sprintf("cap_%d", n))
		}
	}
	return out
}

// procCaps returns the capability sets (CapEff, CapBnd...) of a status
// file's text.
func procCaps(t *testing.T, status string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, line := range lines(status) {
		name, val, ok := strings.Cut(line, ":\t")
		if ok && strings.HasPrefix(name, "Cap") {
			out[name] = capSet(t, strings.TrimSpace(val))
		}
	}
	return out
}

// capsOf runs guestagent_capabilities with GUESTAGENT_CAPABILITIES set to
// value (unset for unset) in sh, set before the script is sourced, as
// OpenRC sources conf.d first.
func capsOf(t *testing.T, sh posixShell, value string) (string, string, bool) {
	t.Helper()
	script := settings{"GUESTAGENT_CAPABILITIES": value}.script() +
		". " + quote(absPath(t, initScript)) + "\nguestagent_capabilities\n"
	out, stderr, ok := sh.run(t, script)
	return strings.TrimSuffix(out, "\n"), stderr, ok
}

func TestCapabilitiesSetting(t *testing.T) {
	tests := []struct {
		name, value, want string
	}{
		{"the default", unset, strings.Join(agentCaps, " ")},
		{"empty is the default", "", strings.Join(agentCaps, " ")},
		{"names in any order, case and separator, with or without cap_", "CAP_NET_ADMIN,bpf  net_raw,cap_net_admin", "net_admin net_raw bpf"},
		{"all keeps every one", "net_admin all", "all"},
	}
	each(t, func(t *testing.T, sh posixShell) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, stderr, ok := capsOf(t, sh, tt.value)
				if !ok {
					t.Fatalf("the script failed: %s", stderr)
				}
				if got != tt.want {
					t.Errorf("guestagent_capabilities = %q, want %q", got, tt.want)
				}
			})
		}
		t.Run("an unknown name fails, named", func(t *testing.T) {
			got, stderr, ok := capsOf(t, sh, "net_admin cap_net_rwa")
			if ok {
				t.Fatalf("the script succeeded with %q", got)
			}
			if !strings.Contains(stderr, `"net_rwa"`) || !strings.Contains(stderr, "GUESTAGENT_CAPABILITIES") {
				t.Errorf("the error %q names neither the value nor the variable", stderr)
			}
		})
	})
}

// TestIABLeavesExactlyTheKeptSet has libcap parse and apply the text the
// service gives supervise-daemon's --capabilities, as supervise-daemon
// does (cap_iab_from_text, cap_iab_set_proc), through capsh --iab, and
// reads the capabilities the program it runs has: exactly the kept ones,
// in the bounding, permitted and effective sets, none inheritable or
// ambient. The kernel's own cap_last_cap is given, and one far above it,
// which libcap must take too.
func TestIABLeavesExactlyTheKeptSet(t *testing.T) {
	testenv.Integration(t)
	if os.Geteuid() != 0 {
		testenv.Missing(t, "root (to drop capabilities)")
	}
	capsh := testenv.Binary(t, "GUESTAGENT_CAPSH", "capsh")
	last := strings.TrimSpace(readFile("/proc/sys/kernel/cap_last_cap"))
	for _, last := range []string{last, "63"} {
		t.Run("cap_last_cap="+last, func(t *testing.T) {
			script := ". " + quote(absPath(t, initScript)) + "\nguestagent_iab \"$(guestagent_capabilities)\" " + last + "\n"
			out, stderr, ok := posixShell{name: "sh", argv: []string{"/bin/sh"}}.run(t, script)
			if !ok {
				t.Fatalf("the script failed: %s", stderr)
			}
			iab := strings.TrimSpace(out)
			status, err := exec.Command(capsh, "--iab="+iab, "--", "-c", "cat /proc/self/status").CombinedOutput()
			if err != nil {
				t.Fatalf("capsh --iab=%s: %v\n%s", iab, err, status)
			}
			// What this machine's bounding set lacks, nothing can keep.
			have := procCaps(t, readFile("/proc/self/status"))["CapBnd"]
			var want []string
			for _, c := range agentCaps {
				if slices.Contains(have, c) {
					want = append(want, c)
				}
			}
			got := procCaps(t, string(status))
			for _, set := range []string{"CapBnd", "CapPrm", "CapEff"} {
				if !slices.Equal(got[set], want) {
					t.Errorf("%s = %q, want %q (iab %s)", set, got[set], want, iab)
				}
			}
			for _, set := range []string{"CapInh", "CapAmb"} {
				if len(got[set]) != 0 {
					t.Errorf("%s = %q, want none", set, got[set])
				}
			}
		})
	}
}

// TestEnvironmentFileIsReadAsPamEnvDoes runs the respawn step's reading of
// /etc/environment on a file with every kind of line and reads what a
// program it starts gets: the NAME=VALUE lines as pam_env reads them,
// nothing evaluated, and a warning naming each line that is not one.
func TestEnvironmentFileIsReadAsPamEnvDoes(t *testing.T) {
	dir := t.TempDir()
	witness := dir + "/evaluated"
	envFile := dir + "/environment"
	content := strings.Join([]string{
		"# proxies of the desktop app",
		"",
		`http_proxy="http://proxy.example:3128"`,
		"  export HTTPS_PROXY='http://user:p#ss@proxy.example:3128'",
		"\tNO_PROXY=localhost,127.0.0.1,.local   # not the comment",
		"EMPTY=",
		"SPACED=\"a  b\"",
		"LITERAL=$(touch " + witness + ")`touch " + witness + "`$HOME",
		"this line has no equals sign",
		"BAD-NAME=x",
		"1ST=x",
		"=x",
		"LAST=no newline after it",
	}, "\n")
	if err := os.WriteFile(envFile, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"http_proxy":  "http://proxy.example:3128",
		"HTTPS_PROXY": "http://user:p#ss@proxy.example:3128",
		"NO_PROXY":    "localhost,127.0.0.1,.local",
		"EMPTY":       "",
		"SPACED":      "a  b",
		"LITERAL":     "$(touch " + witness + ")`touch " + witness + "`$HOME",
		"LAST":        "no newline after it",
	}
	each(t, func(t *testing.T, sh posixShell) {
		script := ". " + quote(absPath(t, initScript)) + "\n_guestagent_load_env " + quote(envFile) + "\nexec env -0\n"
		out, stderr, ok := sh.run(t, script)
		if !ok {
			t.Fatalf("the script failed: %s", stderr)
		}
		got := map[string]string{}
		for _, kv := range strings.Split(out, "\x00") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				got[k] = v
			}
		}
		for k, v := range want {
			if g, ok := got[k]; !ok || g != v {
				t.Errorf("%s = %q (set: %v), want %q", k, g, ok, v)
			}
		}
		for _, k := range []string{"BAD-NAME", "1ST", ""} {
			if _, ok := got[k]; ok {
				t.Errorf("%q is in the environment", k)
			}
		}
		if _, err := os.Stat(witness); err == nil {
			t.Error("a value was evaluated")
		}
		for _, n := range []int{9, 10, 11, 12} {
			if m := fmt.Sprintf("%s:%d: not NAME=VALUE", envFile, n); !strings.Contains(stderr, m) {
				t.Errorf("no warning %q in %q", m, stderr)
			}
		}
		if strings.Count(stderr, "not NAME=VALUE") != 4 {
			t.Errorf("warnings %q, want one for each of the 4 bad lines", stderr)
		}
	})
}

// TestGeneratedRotationHasTheShippedRules compares the rules the service
// writes for a log outside /var/log with those of the shipped logrotate
// file: the same, with "su root root" added.
func TestGeneratedRotationHasTheShippedRules(t *testing.T) {
	rules := func(conf string) (path string, directives []string) {
		for _, line := range lines(conf) {
			line = strings.TrimSpace(line)
			switch {
			case line == "" || strings.HasPrefix(line, "#") || line == "}":
			case strings.HasSuffix(line, "{"):
				path = strings.TrimSpace(strings.TrimSuffix(line, "{"))
			default:
				directives = append(directives, line)
			}
		}
		return path, directives
	}
	_, shipped := rules(readFile(absPath(t, logrotateFile)))
	each(t, func(t *testing.T, sh posixShell) {
		const log = "/mnt/c/Users/Jane Doe/AppData/Local/rancher-desktop/logs/rancher-desktop-guestagent.log"
		out, stderr, ok := sh.run(t, ". "+quote(absPath(t, initScript))+"\nguestagent_logrotate "+quote(log)+"\n")
		if !ok {
			t.Fatalf("the script failed: %s", stderr)
		}
		path, got := rules(out)
		if path != `"`+log+`"` {
			t.Errorf("path %s, want %q", path, log)
		}
		if want := append(slices.Clone(shipped), "su root root"); !slices.Equal(got, want) {
			t.Errorf("rules %q, want %q", got, want)
		}
	})
}
