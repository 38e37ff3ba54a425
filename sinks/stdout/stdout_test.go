package stdout_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/stdout"
	"github.com/guestagent/guestagent/wire"
)

// lockedBuffer is the sink's "peer": everything it printed.
type lockedBuffer struct {
	testenv.SyncBuffer
}

func (b *lockedBuffer) lines(t *testing.T) []stdout.Line {
	var out []stdout.Line
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	for sc.Scan() {
		var l stdout.Line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("line %q is not JSON: %v", sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

// state replays the printed lines into the set of exposed ports.
func (b *lockedBuffer) state(t *testing.T) []string {
	exposed := map[string]bool{}
	for _, l := range b.lines(t) {
		ports, err := wire.ParsePorts(l.Ports)
		if err != nil {
			t.Fatalf("printed ports do not parse: %v", err)
		}
		for _, p := range ports {
			exposed[sinktest.Entry(p)] = !l.Remove
		}
	}
	var out []string
	for e, on := range exposed {
		if on {
			out = append(out, e)
		}
	}
	return out
}

func newSink(t *testing.T, w io.Writer) *stdout.Sink {
	t.Helper()
	s, err := stdout.New(stdout.Config{Writer: w})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestContract(t *testing.T) {
	var buf lockedBuffer
	sinktest.Run(t, sinktest.Harness{
		New:   func(t *testing.T) core.Sink { return newSink(t, &buf) },
		State: buf.state,
	})
}

// TestNoWriterPrintsOnStdout: the zero Config prints on os.Stdout.
func TestNoWriterPrintsOnStdout(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	saved := os.Stdout
	os.Stdout = w
	s, err := stdout.New(stdout.Config{})
	os.Stdout = saved
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(t.Context(), core.Change{Mapping: sinktest.Mapping("docker", "abc", 8080, 1)}); err != nil {
		t.Fatal(err)
	}
	w.Close()
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(out), `{"source":"docker","id":"abc","remove":false,`) {
		t.Errorf("os.Stdout got %q, want the change's line", out)
	}
}

func TestLineFormat(t *testing.T) {
	var buf bytes.Buffer
	m := sinktest.Mapping("docker", "abc", 8080, 1)
	m.ConnectAddrs = []core.ConnectAddr{{Network: "tcp", Addr: "10.4.0.22:80"}}
	if err := newSink(t, &buf).Send(t.Context(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	want := `{"source":"docker","id":"abc","remove":true,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]},"connectAddrs":[{"network":"tcp","addr":"10.4.0.22:80"}]}` + "\n"
	if got := buf.String(); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	if n := bytes.Count(buf.Bytes(), []byte("\n")); n != 1 {
		t.Errorf("want exactly one line, got %d", n)
	}
}
