package packaging_test

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
)

// The boolean variables the desktop app writes into conf.d, in the order
// the service script passes their flags.
var boolVars = []struct{ name, flag string }{
	{"GUESTAGENT_ADMIN_INSTALL", "adminInstall"},
	{"GUESTAGENT_PRIVILEGED_SERVICE", "privilegedService"},
	{"GUESTAGENT_KUBERNETES", "kubernetes"},
	{"GUESTAGENT_IPTABLES", "iptables"},
	{"GUESTAGENT_DOCKER", "docker"},
	{"GUESTAGENT_CONTAINERD", "containerd"},
}

// unset is the state of a variable the settings do not mention.
const unset = "<unset>"

// settings are conf.d variables by name; a missing or unset one is unset
// in the shell.
type settings map[string]string

// script returns shell lines that put the variables in these states.
func (s settings) script() string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(s)) {
		if v := s[name]; v == unset {
			fmt.Fprintf(&b, "unset %s\n", name)
		} else {
			fmt.Fprintf(&b, "%s=%s\n", name, quote(v))
		}
	}
	return b.String()
}

// argsOf returns what guestagent_args prints for s in sh, and what the
// command_args string of guestagent_command_args gives back when a shell
// evaluates it, as supervise-daemon's start does.
func argsOf(t *testing.T, sh posixShell, s settings) (args, evaluated []string, stderr string, ok bool) {
	t.Helper()
	script := ". " + quote(absPath(t, initScript)) + "\n" + s.script() + `
guestagent_args || exit 1
echo '=='
command_args=$(guestagent_command_args) || exit 2
eval "set -- $command_args"
for a; do printf '%s\n' "$a"; done
`
	out, stderr, ok := sh.run(t, script)
	before, after, _ := strings.Cut(out, "==\n")
	return lines(before), lines(after), stderr, ok
}

func TestArgsFromSettings(t *testing.T) {
	tests := []struct {
		name string
		set  settings
		want []string
	}{
		{"nothing set passes no flag", settings{}, nil},
		{"empty values pass no flag", settings{
			"GUESTAGENT_ADMIN_INSTALL": "", "GUESTAGENT_KUBERNETES": "", "GUESTAGENT_DOCKER": "",
			"GUESTAGENT_CONTAINERD": "", "GUESTAGENT_K8S_SVC_ADDR": "", "GUESTAGENT_DEBUG": "",
			"GUESTAGENT_EXTRA_ARGS": "",
		}, nil},
		{"non-admin moby as the desktop app writes it", settings{
			"GUESTAGENT_ADMIN_INSTALL": "false", "GUESTAGENT_KUBERNETES": "true",
			"GUESTAGENT_CONTAINERD": "false", "GUESTAGENT_DOCKER": "true",
			"GUESTAGENT_DEBUG": "false", "GUESTAGENT_K8S_SVC_ADDR": "127.0.0.1",
		}, []string{"-adminInstall=false", "-kubernetes", "-docker", "-containerd=false", "-k8sServiceListenerAddr=127.0.0.1"}},
		{"admin containerd with debug as the desktop app writes it", settings{
			"GUESTAGENT_ADMIN_INSTALL": "true", "GUESTAGENT_KUBERNETES": "false",
			"GUESTAGENT_CONTAINERD": "true", "GUESTAGENT_DOCKER": "false",
			"GUESTAGENT_DEBUG": "true", "GUESTAGENT_K8S_SVC_ADDR": "0.0.0.0",
		}, []string{"-adminInstall", "-kubernetes=false", "-docker=false", "-containerd", "-k8sServiceListenerAddr=0.0.0.0", "-debug"}},
		{"service address alone", settings{"GUESTAGENT_K8S_SVC_ADDR": "0.0.0.0"}, []string{"-k8sServiceListenerAddr=0.0.0.0"}},
		{"debug false passes nothing", settings{"GUESTAGENT_DEBUG": "false"}, nil},
		{"debug 0 passes nothing", settings{"GUESTAGENT_DEBUG": "0"}, nil},
		{"debug 1 is debug", settings{"GUESTAGENT_DEBUG": "1"}, []string{"-debug"}},
		{"the flag parser's other spellings", settings{
			"GUESTAGENT_DOCKER": "TRUE", "GUESTAGENT_CONTAINERD": "F", "GUESTAGENT_IPTABLES": "0",
		}, []string{"-iptables=false", "-docker", "-containerd=false"}},
		{"extra arguments come last, split as shell words", settings{
			"GUESTAGENT_DOCKER":     "true",
			"GUESTAGENT_EXTRA_ARGS": `--statusAddr=127.0.0.1:9901  'two words' "it's" \$HOME --dockerHost="unix:///x y"`,
		}, []string{"-docker", "--statusAddr=127.0.0.1:9901", "two words", "it's", "$HOME", "--dockerHost=unix:///x y"}},
		{"an empty extra argument stays", settings{"GUESTAGENT_EXTRA_ARGS": `--stateDir ''`}, []string{"--stateDir", ""}},
	}
	each(t, func(t *testing.T, sh posixShell) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				args, evaluated, stderr, ok := argsOf(t, sh, tt.set)
				if !ok {
					t.Fatalf("the script failed: %s", stderr)
				}
				if !slices.Equal(args, tt.want) {
					t.Errorf("guestagent_args = %q, want %q", args, tt.want)
				}
				if !slices.Equal(evaluated, tt.want) {
					t.Errorf("command_args evaluated = %q, want %q", evaluated, tt.want)
				}
			})
		}
	})
}

func TestInvalidSettingsFailWithTheVariableNamed(t *testing.T) {
	tests := []struct {
		name    string
		set     settings
		mention []string
	}{
		{"a boolean that is not true or false", settings{"GUESTAGENT_DOCKER": "yes"}, []string{`"yes"`, "-docker"}},
		{"debug that is not true or false", settings{"GUESTAGENT_DEBUG": "on"}, []string{`"on"`, "-debug"}},
		{"a bad value after good ones", settings{"GUESTAGENT_ADMIN_INSTALL": "true", "GUESTAGENT_CONTAINERD": "ture"}, []string{`"ture"`, "-containerd"}},
		{"an extra argument with a newline", settings{"GUESTAGENT_EXTRA_ARGS": "'a\nb'"}, []string{"GUESTAGENT_EXTRA_ARGS", "newline"}},
	}
	each(t, func(t *testing.T, sh posixShell) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				args, _, stderr, ok := argsOf(t, sh, tt.set)
				if ok {
					t.Fatalf("the script succeeded with %q", args)
				}
				for _, m := range tt.mention {
					if !strings.Contains(stderr, m) {
						t.Errorf("the error %q does not mention %s", stderr, m)
					}
				}
			})
		}
	})
}

func TestUnbalancedQuoteInExtraArgsFails(t *testing.T) {
	each(t, func(t *testing.T, sh posixShell) {
		if args, _, _, ok := argsOf(t, sh, settings{"GUESTAGENT_EXTRA_ARGS": `--debug 'open`}); ok {
			t.Fatalf("the script succeeded with %q", args)
		}
	})
}

// boolStates are the states of each boolean variable in the cross product.
var boolStates = []string{unset, "", "true", "false"}

// wantArgs is the mapping the service script implements: true passes
// -flag, false -flag=false, unset or empty nothing; the service address
// passes its flag when set; debug is passed only when true.
func wantArgs(s settings) []string {
	var want []string
	for _, v := range boolVars {
		switch s[v.name] {
		case "true":
			want = append(want, "-"+v.flag)
		case "false":
			want = append(want, "-"+v.flag+"=false")
		}
	}
	if a := s["GUESTAGENT_K8S_SVC_ADDR"]; a != unset && a != "" {
		want = append(want, "-k8sServiceListenerAddr="+a)
	}
	if s["GUESTAGENT_DEBUG"] == "true" {
		want = append(want, "-debug")
	}
	return want
}

// TestArgsForEveryCombination checks every combination of the boolean
// variables and debug in {unset, empty, true, false} and the service
// address unset, empty or set (49152 in all), in one run of the shell.
func TestArgsForEveryCombination(t *testing.T) {
	names := []string{"GUESTAGENT_DEBUG"}
	for _, v := range boolVars {
		names = append(names, v.name)
	}
	var all []settings
	var combine func(i int, s settings)
	combine = func(i int, s settings) {
		if i == len(names) {
			for _, addr := range []string{unset, "", "0.0.0.0"} {
				c := maps.Clone(s)
				c["GUESTAGENT_K8S_SVC_ADDR"] = addr
				all = append(all, c)
			}
			return
		}
		for _, state := range boolStates {
			s[names[i]] = state
			combine(i+1, s)
		}
	}
	combine(0, settings{})

	var script strings.Builder
	script.WriteString(". " + quote(absPath(t, initScript)) + "\n")
	for i, s := range all {
		fmt.Fprintf(&script, "%secho '== %d'\nguestagent_args || echo '!! failed'\n", s.script(), i)
	}
	each(t, func(t *testing.T, sh posixShell) {
		out, stderr, ok := sh.run(t, script.String())
		if !ok {
			t.Fatalf("the script failed: %s", stderr)
		}
		got := make([][]string, 0, len(all))
		for _, line := range lines(out) {
			if strings.HasPrefix(line, "== ") {
				got = append(got, nil)
				continue
			}
			if len(got) == 0 {
				t.Fatalf("output before the first case: %q", line)
			}
			got[len(got)-1] = append(got[len(got)-1], line)
		}
		if len(got) != len(all) {
			t.Fatalf("%d cases ran, want %d", len(got), len(all))
		}
		failed := 0
		for i, s := range all {
			if want := wantArgs(s); !slices.Equal(got[i], want) {
				if failed++; failed <= 10 {
					t.Errorf("with\n%s guestagent_args = %q, want %q", s.script(), got[i], want)
				}
			}
		}
		if failed > 10 {
			t.Errorf("%d of %d combinations differ; the first 10 are shown", failed, len(all))
		}
	})
}

// The shipped conf.d file sets nothing, so an untouched install runs the
// agent on its defaults; the desktop app writes the file in full.
func TestShippedConfPassesNoFlag(t *testing.T) {
	each(t, func(t *testing.T, sh posixShell) {
		script := ". " + quote(absPath(t, confFile)) + "\n. " + quote(absPath(t, initScript)) + "\nguestagent_args\n"
		out, stderr, ok := sh.run(t, script)
		if !ok {
			t.Fatalf("the script failed: %s", stderr)
		}
		if out != "" {
			t.Errorf("guestagent_args = %q, want nothing", lines(out))
		}
	})
}
