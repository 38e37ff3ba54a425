package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
)

// testAgent runs the agent in process (non-admin mode, the static source
// with body as its file, the stdout sink) until the test ends, and
// returns a function that runs a command against it.
func testAgent(t *testing.T, body string) func(args ...string) (int, string, string) {
	cmd, _ := testAgentAt(t, body)
	return cmd
}

// testAgentAt is testAgent that also returns the control socket.
func testAgentAt(t *testing.T, body string) (func(args ...string) (int, string, string), string) {
	t.Helper()
	sock := controlSocket(t)
	file := filepath.Join(t.TempDir(), "static.json")
	if err := os.WriteFile(file, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	var out, errOut syncBuffer
	go func() {
		done <- run(ctx, []string{"--sources=static", "--staticFile=" + file, "--sinks=stdout",
			"--stateDir=" + t.TempDir(), "--controlSocket=" + sock}, &out, &errOut)
	}()
	t.Cleanup(func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("agent exit %d:\n%s", code, errOut.String())
		}
	})
	return func(args ...string) (int, string, string) {
		var o, e syncBuffer
		code := run(t.Context(), append(args, "--socket="+sock), &o, &e)
		return code, o.String(), e.String()
	}, sock
}

const oneWebPort = `{"mappings":[{"id":"web","ports":[
	{"protocol":"tcp","containerPort":80,"hostIP":"0.0.0.0","hostPort":18080},
	{"protocol":"tcp","containerPort":443,"hostPort":443}]}]}`

// exposedOnce waits until the stdout sink holds the web port.
func exposedOnce(t *testing.T, cmd func(args ...string) (int, string, string)) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, "the web port to be exposed", func() (bool, string) {
		code, o, e := cmd("status")
		return code == 0 && regexp.MustCompile(`127\.0\.0\.1:18080 .* exposed`).MatchString(o), o + e
	})
}

// TestOutputFormats checks -o table (the default), -o wide, -o json and
// its alias --json for status and explain, and that an unknown format or
// a clash is an error that names the valid ones.
func TestOutputFormats(t *testing.T) {
	cmd := testAgent(t, oneWebPort)
	exposedOnce(t, cmd)

	_, def, _ := cmd("status")
	code, table, _ := cmd("status", "-o", "table")
	if code != 0 || !strings.HasPrefix(table, "PROTO ") || strings.Count(table, "\n") != strings.Count(def, "\n") {
		t.Errorf("status -o table: exit %d, want the default's lines:\n%s\n--- default\n%s", code, table, def)
	}
	code, wide, _ := cmd("status", "-o", "wide")
	if code != 0 || !strings.Contains(wide, "CONTAINER PORT") || strings.Contains(table, "CONTAINER PORT") {
		t.Errorf("status -o wide: exit %d, want a CONTAINER PORT column the table lacks:\n%s", code, wide)
	}
	for _, args := range [][]string{{"status", "-o", "json"}, {"status", "--output=json"}, {"status", "--json"}, {"status", "-json"}} {
		code, js, e := cmd(args...)
		var st core.Status
		if err := json.Unmarshal([]byte(js), &st); code != 0 || err != nil || len(st.Ports) != 1 || st.Ports[0].HostPort != 18080 || len(st.Refused) != 1 {
			t.Errorf("%q: exit %d, %v, status %+v:\n%s%s", args, code, err, st, js, e)
		}
	}
	code, js, _ := cmd("explain", "18080", "-o", "json")
	var ex explanation
	if err := json.Unmarshal([]byte(js), &ex); code != 0 || err != nil || len(ex.Ports) != 1 || ex.Port != 18080 {
		t.Errorf("explain -o json: exit %d, %v:\n%s", code, err, js)
	}
	code, tx, _ := cmd("explain", "18080", "-o", "wide")
	if code != 0 || !strings.Contains(tx, "stdout holds it") {
		t.Errorf("explain -o wide: exit %d:\n%s", code, tx)
	}

	for _, args := range [][]string{{"status", "-o", "yaml"}, {"watch", "-o", "yaml"}, {"explain", "80", "-o", "yaml"}} {
		code, o, e := cmd(args...)
		if code != 2 || o != "" || !strings.Contains(e, `-o "yaml": want one of table, wide, json`) {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 2 and the valid formats", args, code, o, e)
		}
	}
	if code, _, e := cmd("status", "--json", "-o", "wide"); code != 2 || !strings.Contains(e, "--json is -o json") {
		t.Errorf("--json with -o wide: exit %d, %q", code, e)
	}
	if code, _, e := cmd("status", "--json", "-o", "json"); code != 0 || e != "" {
		t.Errorf("--json with -o json: exit %d, %q", code, e)
	}
}

// TestOutputHelpHidesTheJSONAlias checks that each command's help
// documents -o with its formats and leaves out the old --json.
func TestOutputHelpHidesTheJSONAlias(t *testing.T) {
	for _, name := range []string{"status", "watch", "explain"} {
		var o, e bytes.Buffer
		if code := run(t.Context(), []string{name, "--help"}, &o, &e); code != 0 {
			t.Fatalf("%s --help: exit %d: %s", name, code, e.String())
		}
		help := o.String()
		if !strings.Contains(help, "-o, --output string") || !strings.Contains(help, "table") || !strings.Contains(help, "json") || strings.Contains(help, "--json") {
			t.Errorf("%s --help, want -o with its formats and no --json:\n%s", name, help)
		}
	}
}

// TestStatusQuiet checks status -q: the exposed ports alone, one per line,
// without the refused one; nothing (and exit 0) when none is exposed.
func TestStatusQuiet(t *testing.T) {
	cmd := testAgent(t, oneWebPort)
	exposedOnce(t, cmd)
	for _, args := range [][]string{{"status", "-q"}, {"status", "--quiet"}, {"status", "-q", "-o", "table"}} {
		if code, o, e := cmd(args...); code != 0 || o != "tcp 127.0.0.1:18080\n" {
			t.Errorf("%q: exit %d, %q (%s), want the one exposed port", args, code, o, e)
		}
	}
	if code, _, e := cmd("status", "-q", "-o", "json"); code != 2 || !strings.Contains(e, "-q prints the ports alone") {
		t.Errorf("-q with -o json: exit %d, %q", code, e)
	}

	empty := testAgent(t, `{"mappings":[]}`)
	testenv.Eventually(t, 15*time.Second, "the empty agent to answer", func() (bool, string) {
		code, o, e := empty("status")
		return code == 0, o + e
	})
	if code, o, e := empty("status", "-q"); code != 0 || o != "" || e != "" {
		t.Errorf("status -q with nothing exposed: exit %d, stdout %q, stderr %q; want nothing", code, o, e)
	}
}

// TestExposedPortsSkipsWhatNoSinkHolds checks that -q leaves out a port
// that no sink holds (retrying, in conflict, unsupported).
func TestExposedPortsSkipsWhatNoSinkHolds(t *testing.T) {
	st := goldenStatus(time.Now())
	st.Ports[0].Sinks = []core.PortAtSink{{Sink: "host-switch", State: core.PortRetrying}}
	got := exposedPorts(st)
	want := []string{"tcp 0.0.0.0:30080", "tcp 127.0.0.1:6443", "tcp 127.0.0.1:9000", "tcp [::]:8081"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("exposed ports %q, want %q", got, want)
	}
}

// nullsIn walks v (decoded JSON) and returns the path of every null.
func nullsIn(v any, path string) []string {
	var out []string
	switch x := v.(type) {
	case nil:
		out = append(out, path)
	case map[string]any:
		for k, e := range x {
			out = append(out, nullsIn(e, path+"."+k)...)
		}
	case []any:
		for _, e := range x {
			out = append(out, nullsIn(e, path+"[]")...)
		}
	}
	return out
}

// TestStatusJSONEmptyListsAreEmpty checks that an agent with nothing to
// report prints each list of its status and explanations as [], and that
// no list at any depth is null.
func TestStatusJSONEmptyListsAreEmpty(t *testing.T) {
	cmd := testAgent(t, `{"mappings":[]}`)
	var js string
	testenv.Eventually(t, 15*time.Second, "the status", func() (bool, string) {
		var code int
		code, js, _ = cmd("status", "-o", "json")
		return code == 0, js
	})
	var top map[string]json.RawMessage
	if err := json.Unmarshal([]byte(js), &top); err != nil {
		t.Fatalf("%v:\n%s", err, js)
	}
	for _, k := range []string{"ports", "mappings", "refused", "notes"} {
		if string(top[k]) != "[]" {
			t.Errorf("%q is %s, want []:\n%s", k, top[k], js)
		}
	}
	for _, k := range []string{"sources", "sinks"} {
		if !strings.HasPrefix(string(top[k]), "[") {
			t.Errorf("%q is %s, want a list:\n%s", k, top[k], js)
		}
	}
	var v any
	_ = json.Unmarshal([]byte(js), &v)
	if nulls := nullsIn(v, ""); len(nulls) > 0 {
		t.Errorf("nulls at %q:\n%s", nulls, js)
	}
	_, ex, _ := cmd("explain", "80", "-o", "json")
	var e map[string]json.RawMessage
	if err := json.Unmarshal([]byte(ex), &e); err != nil {
		t.Fatalf("%v:\n%s", err, ex)
	}
	for _, k := range []string{"ports", "refused", "nearest"} {
		if string(e[k]) != "[]" {
			t.Errorf("explain: %q is %s, want []:\n%s", k, e[k], ex)
		}
	}

	// The lists inside: a port with no sink (the filters left it out), a
	// note with no port, a mapping with no port.
	st := core.Status{
		Ports:    []core.PortStatus{{Protocol: core.TCP, HostPort: 1, Claims: []core.ClaimStatus{{Key: core.Key{Source: "s", ID: "a"}}}}},
		Mappings: []core.Mapping{{Key: core.Key{Source: "s", ID: "a"}}},
		Notes:    []core.Note{{Key: core.Key{Source: "s", ID: "b"}, What: "x", Reason: "y"}},
		Sources:  []core.SourceStatus{{Name: "s"}},
	}
	b, err := json.Marshal(statusForJSON(st))
	if err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal(b, &v)
	if nulls := nullsIn(v, ""); len(nulls) > 0 {
		t.Errorf("nulls at %q:\n%s", nulls, b)
	}
	if s := string(b); !strings.Contains(s, `"sinks":[]`) || strings.Count(s, `"ports":[]`) != 2 {
		t.Errorf("want the port's sinks and the note's and mapping's ports as []:\n%s", s)
	}
}

// portFields are the JSON fields that spell a host address.
var portFields = []string{"protocol", "hostIP", "hostPort"}

// TestWatchAndStatusSpellAPortAlike reads the same port from status -o
// json and from watch -o json: the fields, and their JSON, are the same,
// its claims included.
func TestWatchAndStatusSpellAPortAlike(t *testing.T) {
	cmd, sock := testAgentAt(t, oneWebPort)
	exposedOnce(t, cmd)
	_, js, _ := cmd("status", "-o", "json")
	var st struct {
		Ports   []map[string]json.RawMessage `json:"ports"`
		Refused []struct {
			Port map[string]json.RawMessage `json:"port"`
		} `json:"refused"`
	}
	if err := json.Unmarshal([]byte(js), &st); err != nil || len(st.Ports) != 1 || len(st.Refused) != 1 {
		t.Fatalf("status: %v:\n%s", err, js)
	}

	var out, errOut syncBuffer
	wctx, wcancel := context.WithCancel(t.Context())
	wdone := make(chan int, 1)
	go func() { wdone <- run(wctx, []string{"watch", "-o", "json", "--socket=" + sock}, &out, &errOut) }()
	var events []map[string]json.RawMessage
	testenv.Eventually(t, 10*time.Second, "the current state of both ports", func() (bool, string) {
		events = nil
		for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			var ev map[string]json.RawMessage
			if json.Unmarshal([]byte(l), &ev) == nil {
				events = append(events, ev)
			}
		}
		return len(events) >= 2, out.String() + errOut.String()
	})
	wcancel()
	<-wdone
	same := func(what string, status, event map[string]json.RawMessage) {
		t.Helper()
		for _, f := range portFields {
			if status[f] == nil || string(status[f]) != string(event[f]) {
				t.Errorf("%s: %q is %s in status, %s in watch", what, f, status[f], event[f])
			}
		}
		if _, ok := event["port"]; ok {
			t.Errorf("%s: the watch event still has a port string: %s", what, event["port"])
		}
	}
	var exposed, refused map[string]json.RawMessage
	for _, ev := range events {
		switch string(ev["state"]) {
		case `"exposed"`:
			exposed = ev
		case `"refused"`:
			refused = ev
		}
	}
	if exposed == nil || refused == nil {
		t.Fatalf("want an exposed and a refused current event: %s", out.String())
	}
	same("exposed port", st.Ports[0], exposed)
	same("refused port", st.Refused[0].Port, refused)
	var a, b PortAddr
	raw, _ := json.Marshal(st.Ports[0])
	_ = json.Unmarshal(raw, &a)
	raw, _ = json.Marshal(exposed)
	_ = json.Unmarshal(raw, &b)
	if a != b || a.String() != "tcp 127.0.0.1:18080" {
		t.Errorf("status port %v, watch port %v", a, b)
	}
	// A port's claims are the same JSON in both (but for the spaces).
	var inStatus, inWatch bytes.Buffer
	if json.Compact(&inStatus, st.Ports[0]["claims"]) != nil || json.Compact(&inWatch, exposed["claims"]) != nil ||
		inStatus.Len() == 0 || inStatus.String() != inWatch.String() {
		t.Errorf("claims are %s in status, %s in watch", st.Ports[0]["claims"], exposed["claims"])
	}
}

// helpOf runs args (ending in --help) and returns the help.
func helpOf(t *testing.T, args ...string) string {
	t.Helper()
	var o, e bytes.Buffer
	if code := run(t.Context(), args, &o, &e); code != 0 || e.Len() > 0 {
		t.Fatalf("%q: exit %d: %s", args, code, e.String())
	}
	return o.String()
}

var helpCommands = [][]string{{"--help"}, {"status", "--help"}, {"watch", "--help"}, {"explain", "--help"}, {"version", "--help"}}

// TestHelpFitsIn100Columns checks that no line of the help, the agent's
// and each command's, is wider than 100 columns (the width when stdout
// is not a terminal).
func TestHelpFitsIn100Columns(t *testing.T) {
	for _, args := range helpCommands {
		for i, l := range strings.Split(helpOf(t, args...), "\n") {
			if n := len([]rune(l)); n > maxHelpWidth {
				t.Errorf("%q line %d has %d columns:\n%s", args, i+1, n, l)
			}
		}
	}
}

func TestHelpWrapText(t *testing.T) {
	got := wrapText("one two three four five", 4, 2, 14)
	if want := "one two\n  three four\n  five"; got != want {
		t.Errorf("wrapText: %q, want %q", got, want)
	}
	if got := breakLongWords("  -x  (default [1,2,3,4,5,6])", 20); got != "  -x  (default [1,2,\n  3,4,5,6])" {
		t.Errorf("breakLongWords: %q", got)
	}
}

// TestHelpSaysEachDefaultOnce checks that no flag's help, nor any line,
// says "default" twice, and that --dockerHost keeps both what its default
// is made of and its value here.
func TestHelpSaysEachDefaultOnce(t *testing.T) {
	for _, args := range helpCommands {
		help := helpOf(t, args...)
		for _, l := range strings.Split(help, "\n") {
			if strings.Count(l, "default") > 1 {
				t.Errorf("%q: a line says default twice:\n%s", args, l)
			}
		}
		// One entry per flag: from a line that starts a flag to the next.
		entries := regexp.MustCompile(`(?m)^\s+(-\w, )?--`).Split(help, -1)
		for _, e := range entries[1:] {
			e = strings.Join(strings.Fields(e), " ")
			if strings.Count(e, "(default") > 1 {
				t.Errorf("%q: a flag says its default twice: %s", args, e)
			}
			if strings.HasPrefix(e, "dockerHost ") && !strings.Contains(e, `(default from DOCKER_HOST, else the standard socket; here "`) {
				t.Errorf("--dockerHost: %s", e)
			}
		}
	}
}

// TestHelpNamesTheSinksOfEachMode checks that the networking modes of the
// help name the sinks that --sinks=auto picks in each, the default mode's
// host-switch and wsl-proxy included.
func TestHelpNamesTheSinksOfEachMode(t *testing.T) {
	help := strings.Join(strings.Fields(helpOf(t, "--help")), " ")
	i := strings.Index(help, "Networking modes (")
	if i < 0 {
		t.Fatalf("no modes paragraph:\n%s", help)
	}
	modesText := help[i:]
	_, neither, _ := strings.Cut(modesText, "with neither,")
	neither, _, _ = strings.Cut(neither, ";")
	b := defaultBound(t)
	for _, s := range b.AutoSinks(registry.Options{Mode: core.ModeLocal}) {
		if !strings.Contains(neither, s) {
			t.Errorf("the default mode's text %q lacks %s", neither, s)
		}
	}
	if !strings.Contains(neither, "localhost") || !strings.Contains(modesText, "wsl-proxy gets the ports too while --wslIntegration is on (the default)") {
		t.Errorf("modes paragraph: %s", modesText)
	}
	if got := b.AutoSinks(registry.Options{Mode: core.ModeLocal, WSLIntegration: true}); !reflect.DeepEqual(got, []string{"host-switch", "wsl-proxy"}) {
		t.Errorf("the default mode's sinks are %q; the help says host-switch and wsl-proxy", got)
	}
}

// TestVersionCommand checks that version prints what --version prints
// and that -o json gives the version and the Go version.
func TestVersionCommand(t *testing.T) {
	line := func(args ...string) string {
		var o, e bytes.Buffer
		if code := run(t.Context(), args, &o, &e); code != 0 {
			t.Fatalf("%q: exit %d: %s", args, code, e.String())
		}
		return o.String()
	}
	if a, b := line("version"), line("--version"); a != b || !strings.HasPrefix(a, "guestagent ") {
		t.Errorf("version %q, --version %q", a, b)
	}
	var v map[string]string
	js := line("version", "-o", "json")
	if err := json.Unmarshal([]byte(js), &v); err != nil || v["version"] != versionString() || v["go"] != runtime.Version() {
		t.Errorf("version -o json: %v:\n%s", err, js)
	}
	for k := range v {
		if k != "version" && k != "go" && k != "commit" {
			t.Errorf("version -o json: unknown field %q", k)
		}
	}
	var o, e bytes.Buffer
	if code := run(t.Context(), []string{"version", "-o", "wide"}, &o, &e); code != 2 || !strings.Contains(e.String(), "want one of table, json") {
		t.Errorf("version -o wide: exit %d, %q", code, e.String())
	}
}

// openPty returns the two ends of a new pseudo-terminal whose size is
// cols columns.
func openPty(t *testing.T, cols uint16) (ptmx, pts *os.File) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	t.Cleanup(func() { ptmx.Close() })
	if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pts.Close() })
	if err := unix.IoctlSetWinsize(int(pts.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: cols}); err != nil {
		t.Fatal(err)
	}
	return ptmx, pts
}

// TestHelpWrapsAtTheTerminalWidth checks the width of the help on a
// terminal: its own when narrower than 100 columns, else 100; and 100 on
// anything but a terminal.
func TestHelpWrapsAtTheTerminalWidth(t *testing.T) {
	for cols, want := range map[uint16]int{80: 80, 60: 60, 200: maxHelpWidth} {
		_, pts := openPty(t, cols)
		if got := helpWidth(pts); got != want {
			t.Errorf("a terminal of %d columns: help width %d, want %d", cols, got, want)
		}
	}
	f, err := os.CreateTemp(t.TempDir(), "help")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := helpWidth(f); got != maxHelpWidth {
		t.Errorf("a file: help width %d, want %d", got, maxHelpWidth)
	}
	// The help itself, written to an 80-column terminal and read back.
	ptmx, pts := openPty(t, 80)
	var help bytes.Buffer
	read := make(chan error, 1)
	go func() { _, err := help.ReadFrom(ptmx); read <- err }()
	if code := run(t.Context(), []string{"status", "--help"}, pts, io.Discard); code != 0 {
		t.Fatalf("status --help: exit %d", code)
	}
	pts.Close()
	<-read // EIO once the terminal's last other end is closed
	if help.Len() == 0 {
		t.Fatal("nothing read from the terminal")
	}
	for _, l := range strings.Split(strings.ReplaceAll(help.String(), "\r", ""), "\n") {
		if len(l) > 80 {
			t.Errorf("a line of %d columns on an 80-column terminal:\n%s", len(l), l)
		}
	}
}

// TestStatusEndpointListsAreNeverNull reads GET /status of an agent with
// one port exposed and one refused: no list at any depth is null there
// either; and
// filling the lists leaves the status it was given as it was (readers
// share one).
func TestStatusEndpointListsAreNeverNull(t *testing.T) {
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	stop, _ := startAgent(t, isolated(t, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--statusAddr=" + addr})...)
	defer stop()
	statusUp(t, addr)
	res, err := http.Get("http://" + addr + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	var v any
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("%v:\n%s", err, body)
	}
	if nulls := nullsIn(v, ""); len(nulls) > 0 {
		t.Errorf("GET /status has nulls at %q:\n%s", nulls, body)
	}

	shared := core.Status{Ports: []core.PortStatus{{Protocol: core.TCP, HostPort: 1}}}
	_ = statusForJSON(shared)
	if shared.Ports[0].Claims != nil || shared.Ports[0].Sinks != nil {
		t.Errorf("statusForJSON changed the status it was given: %+v", shared.Ports[0])
	}
}
