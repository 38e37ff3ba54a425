package docker_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/moby/api/types/network"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/docker"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
	"github.com/guestagent/guestagent/wire"
)

// engine is the dockerd the tests share; wrapper runs iptables in its
// namespace.
var (
	engine = testenv.NewShared("dockerd", func(dir string) (*dockerdtest.Dockerd, error) {
		d, err := dockerdtest.Start(dir)
		if err != nil {
			return nil, err
		}
		if wrapper, err = testenv.IptablesWrapper(dir, d.Netns); err != nil {
			d.Close()
			return nil, err
		}
		return d, nil
	}, (*dockerdtest.Dockerd).Close)
	wrapper string
)

func TestMain(m *testing.M) {
	code := m.Run()
	engine.Close()
	os.Exit(code)
}

func requireEngine(t testing.TB) *dockerdtest.Dockerd {
	t.Helper()
	return engine.Get(t)
}

// newSource returns a source for the shared dockerd with its loopback NAT
// rules on, written in the daemon's namespace.
func newSource(t testing.TB) core.Source {
	t.Helper()
	return newSourceNAT(t, loopbacknat.Options{Enabled: true, Iptables: wrapper, Interface: "eth0", GuestIP: "192.168.127.2"})
}

// newSourceNAT returns a source for the shared dockerd with the loopback
// NAT rules nat asks for.
func newSourceNAT(t testing.TB, nat loopbacknat.Options) core.Source {
	t.Helper()
	s, err := docker.New(docker.Config{Host: requireEngine(t).Host, LoopbackNAT: nat,
		Backoff: core.Backoff{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// inspectPorts asks the engine which ports a container published: the
// ground truth the source must report.
func inspectPorts(t *testing.T, d *dockerdtest.Dockerd, id string) []core.Port {
	t.Helper()
	out, err := d.Docker("inspect", "--format", "{{json .NetworkSettings.Ports}}", id)
	if err != nil {
		t.Fatal(err)
	}
	var pm network.PortMap
	if err := json.Unmarshal([]byte(out), &pm); err != nil {
		t.Fatalf("inspect output %q: %v", out, err)
	}
	for k, v := range pm {
		if len(v) == 0 {
			delete(pm, k)
		}
	}
	ports, err := wire.ParsePorts(pm)
	if err != nil {
		t.Fatal(err)
	}
	return ports
}

var seq atomic.Int64

// run starts a container of the test image and returns its id.
func run(t testing.TB, d *dockerdtest.Dockerd, args ...string) string {
	t.Helper()
	name := fmt.Sprintf("t%d", seq.Add(1))
	argv := append([]string{"run", "-d", "--name", name}, args...)
	id, err := d.Docker(append(argv, dockerdtest.WebImage)...)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestContract(t *testing.T) {
	d := requireEngine(t)
	var removals atomic.Int64
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source { return newSource(t) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			base := 20000 + int(seq.Add(1))*10
			var args []string
			switch variant {
			case sourcetest.NoPorts:
			case 0:
				args = []string{"-p", fmt.Sprintf("127.0.0.1:%d:80", base), "-p", fmt.Sprintf("%d:81/udp", base+1)}
			default:
				args = []string{"-p", fmt.Sprintf("%d-%d:80-81", base+2, base+3)}
			}
			id := run(t, d, args...)
			return core.Mapping{Key: core.Key{ID: id}, Ports: inspectPorts(t, d, id)}
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			// Alternate between a stop (stop and die events) and a kill
			// (die only), then remove the container.
			verb := "stop"
			if removals.Add(1)%2 == 0 {
				verb = "kill"
			}
			if _, err := d.Docker(verb, m.ID); err != nil && !strings.Contains(err.Error(), "is not running") {
				t.Fatal(err)
			}
			if _, err := d.Docker("rm", "-f", m.ID); err != nil {
				t.Fatal(err)
			}
		},
		Outage: func(t *testing.T, during func()) {
			d.Stop()
			if err := d.Start(); err != nil {
				t.Fatal(err)
			}
			during()
		},
		Timeout: 60 * time.Second,
	})
}

// TestPortSpecs checks what the source reports for the usual -p forms,
// independently of the engine's own inspect output.
func TestPortSpecs(t *testing.T) {
	d := requireEngine(t)
	r := sourcetest.Start(t, docker.Name, newSource(t))

	tests := []struct {
		args []string
		want []string // a subset of the reported ports (IPv6 twins vary with the host)
		none bool
	}{
		{args: []string{"-p", "18080:80"}, want: []string{"0.0.0.0:18080->80/tcp"}},
		{args: []string{"-p", "127.0.0.1:18081:80"}, want: []string{"127.0.0.1:18081->80/tcp"}},
		{args: []string{"-p", "18082:80/udp"}, want: []string{"0.0.0.0:18082->80/udp"}},
		{args: []string{"-p", "18090-18092:80-82"}, want: []string{"0.0.0.0:18090->80/tcp", "0.0.0.0:18091->81/tcp", "0.0.0.0:18092->82/tcp"}},
		{args: []string{"-P"}, want: []string{"->80/tcp"}},
		{args: nil, none: true},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			id := run(t, d, tt.args...)
			defer func() { _, _ = d.Docker("rm", "-f", id) }()
			if tt.none {
				marker := run(t, d, "-p", "18099:80")
				defer func() { _, _ = d.Docker("rm", "-f", marker) }()
				waitDesired(t, r, marker, func(m core.Mapping, ok bool) bool { return ok })
				if _, ok := find(r, id); ok {
					t.Error("a container without published ports was reported")
				}
				return
			}
			waitDesired(t, r, id, func(m core.Mapping, ok bool) bool {
				got := " " + ports(m) + " "
				for _, w := range tt.want {
					if !strings.Contains(got, w) {
						return false
					}
				}
				return ok
			})
		})
	}
}

// TestLoopbackNATRules checks the rules next to Docker's own, in the
// engine's namespace, and their removal.
func TestLoopbackNATRules(t *testing.T) {
	d := requireEngine(t)
	r := sourcetest.Start(t, docker.Name, newSource(t))

	id := run(t, d, "-p", "127.0.0.1:18181:80")
	waitDesired(t, r, id, func(_ core.Mapping, ok bool) bool { return ok })
	ip, err := d.Docker("inspect", "--format", "{{.NetworkSettings.Networks.bridge.IPAddress}}", id)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`-A DOCKER -d 192.168.127.2/32 -i eth0 -p tcp -m tcp --dport 18181 -m comment --comment "guestagent-loopback:docker" -j DNAT --to-destination ` + ip + ":80",
	}
	dockerOwn := "-A DOCKER -d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 18181 -j DNAT --to-destination " + ip + ":80"
	var rules string
	testenv.Eventually(t, 30*time.Second, "Docker's rule and ours in place", func() (bool, string) {
		rules = testenv.NatRules(t, d.Netns)
		ok := strings.Contains(rules, dockerOwn)
		for _, w := range want {
			ok = ok && strings.Contains(rules, w)
		}
		return ok, rules
	})
	if strings.Index(rules, want[0]) < strings.Index(rules, dockerOwn) {
		t.Errorf("our DNAT rule precedes Docker's:\n%s", rules)
	}
	if n := strings.Count(rules, loopbacknat.CommentPrefix); n != len(want) {
		t.Errorf("%d loopback NAT rules, want %d:\n%s", n, len(want), rules)
	}
	if _, err := d.Docker("stop", id); err != nil {
		t.Fatal(err)
	}
	waitDesired(t, r, id, func(_ core.Mapping, ok bool) bool { return !ok })
	testenv.Eventually(t, 30*time.Second, "the loopback NAT rules gone after the stop", func() (bool, string) {
		rules := testenv.NatRules(t, d.Netns)
		return !strings.Contains(rules, loopbacknat.CommentPrefix), rules
	})
	_, _ = d.Docker("rm", "-f", id)
}

func find(r *core.Router, id string) (core.Mapping, bool) {
	for _, m := range r.Desired() {
		if m.ID == id {
			return m, true
		}
	}
	return core.Mapping{}, false
}

// waitDesired waits until cond holds for what r wants of container id
// (ok tells whether r has a mapping for it at all).
func waitDesired(t *testing.T, r *core.Router, id string, cond func(m core.Mapping, ok bool) bool) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, "container "+id[:12]+" reported as expected", func() (bool, string) {
		m, ok := find(r, id)
		return cond(m, ok), fmt.Sprintf("reported %v (present %v)", ports(m), ok)
	})
}

// TestDaemonNotRunningYet starts the source before its socket exists and
// checks that it connects once the socket appears.
func TestDaemonNotRunningYet(t *testing.T) {
	d := requireEngine(t)
	link := filepath.Join(t.TempDir(), "later.sock")
	obs, logs := observer.New(zapcore.DebugLevel)
	s, err := docker.New(docker.Config{Host: "unix://" + link,
		Backoff: core.Backoff{Initial: 20 * time.Millisecond, Max: 200 * time.Millisecond}, Log: zap.New(obs)})
	if err != nil {
		t.Fatal(err)
	}
	id := run(t, d, "-p", "18281:80")
	defer func() { _, _ = d.Docker("rm", "-f", id) }()
	r := sourcetest.Start(t, docker.Name, s)
	testenv.Eventually(t, 30*time.Second, "several failed attempts", func() (bool, string) {
		n := logs.FilterMessage("Docker API still not reachable").Len()
		return n >= 3, fmt.Sprintf("%d repeated failures logged", n)
	})
	if len(r.Desired()) != 0 {
		t.Fatal("reported containers without a daemon")
	}
	if err := os.Symlink(strings.TrimPrefix(d.Host, "unix://"), link); err != nil {
		t.Fatal(err)
	}
	waitDesired(t, r, id, func(_ core.Mapping, ok bool) bool { return ok })
}
