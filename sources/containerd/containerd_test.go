package containerd_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	cniutils "github.com/containernetworking/plugins/pkg/utils"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/containerd"
	"github.com/guestagent/guestagent/sources/containerd/containerdtest"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// engine is the containerd the tests share.
var engine = testenv.NewShared("containerd", containerdtest.StartContainerd, (*containerdtest.Containerd).Close)

func TestMain(m *testing.M) {
	code := m.Run()
	engine.Close()
	os.Exit(code)
}

func requireEngine(t testing.TB) *containerdtest.Containerd {
	t.Helper()
	return engine.Get(t)
}

// newSource returns a source for the shared containerd, with the loopback
// NAT rules nat asks for (none for its zero value).
func newSource(t testing.TB, nat loopbacknat.Options) core.Source {
	t.Helper()
	s, err := containerd.New(containerd.Config{Socket: requireEngine(t).Socket, LoopbackNAT: nat,
		Backoff: core.Backoff{Initial: 50 * time.Millisecond, Max: 500 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var seq atomic.Int64

func portsLabel(entries ...containerd.PortEntry) map[string]string {
	b, _ := json.Marshal(entries)
	return map[string]string{containerd.LabelPorts: string(b)}
}

func expected(ns, id string, labels map[string]string) core.Mapping {
	ports, _, _ := containerd.NerdctlPorts(containerd.DefaultNerdctlDataRoot, labels)
	return core.Mapping{Key: core.Key{ID: containerd.ID(ns, id)}, Ports: ports}
}

// labelsFor is the nerdctl port label of variant v at base port base.
func labelsFor(variant, base int) map[string]string {
	switch variant {
	case sourcetest.NoPorts:
		return nil
	case 0:
		return portsLabel(
			containerd.PortEntry{HostPort: base, ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"},
			containerd.PortEntry{HostPort: base + 1, ContainerPort: 53, Protocol: "udp", HostIP: "127.0.0.1"})
	default:
		return portsLabel(containerd.PortEntry{HostPort: base + 2, ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"})
	}
}

type ref struct{ ns, id string }

func split(m core.Mapping) ref {
	ns, id, _ := strings.Cut(m.ID, "/")
	return ref{ns, id}
}

// TestContract runs the suite with containers spread over two namespaces.
func TestContract(t *testing.T) {
	c := requireEngine(t)
	bases := map[string]int{}
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source { return newSource(t, loopbacknat.Options{}) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			n := int(seq.Add(1))
			ns := "default"
			if n%2 == 0 {
				ns = "guestagent-test"
			}
			id := uniqueID(fmt.Sprintf("%s-%d", name, n))
			base := 21000 + n*10
			bases[id] = base
			labels := labelsFor(variant, base)
			if err := c.RunContainer(ns, id, labels, ""); err != nil {
				t.Fatal(err)
			}
			return expected(ns, id, labels)
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			r := split(m)
			if err := c.StopContainer(r.ns, r.id); err != nil {
				t.Fatal(err)
			}
			if err := c.RemoveContainer(r.ns, r.id); err != nil {
				t.Fatal(err)
			}
		},
		Update: func(t *testing.T, m core.Mapping, variant int) core.Mapping {
			r := split(m)
			labels := labelsFor(variant, bases[r.id])
			if err := c.SetLabels(r.ns, r.id, labels); err != nil {
				t.Fatal(err)
			}
			return expected(r.ns, r.id, labels)
		},
		Repeat: func(t *testing.T, m core.Mapping) {
			r := split(m)
			ctx := context.Background()
			ctr, err := c.Client.LoadContainer(nsCtx(ctx, r.ns), r.id)
			if err != nil {
				t.Fatal(err)
			}
			labels, err := ctr.Labels(nsCtx(ctx, r.ns))
			if err != nil {
				t.Fatal(err)
			}
			if err := c.SetLabels(r.ns, r.id, labels); err != nil { // an update with nothing changed
				t.Fatal(err)
			}
		},
		Outage: func(t *testing.T, during func()) {
			c.Stop()
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			during()
		},
		Timeout: 60 * time.Second,
	})
}

// TestMalformedLabelIsSkipped checks that a container with garbage port
// data is logged and skipped while the next one is still reported.
func TestMalformedLabelIsSkipped(t *testing.T) {
	c := requireEngine(t)
	r := sourcetest.Start(t, containerd.Name, newSource(t, loopbacknat.Options{}))

	bad, good := uniqueID(fmt.Sprintf("bad-%d", seq.Add(1))), uniqueID(fmt.Sprintf("good-%d", seq.Add(1)))
	if err := c.RunContainer("default", bad, map[string]string{containerd.LabelPorts: `[{"HostPort":`}, ""); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", bad) }()
	labels := labelsFor(0, 22500)
	if err := c.RunContainer("default", good, labels, ""); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", good) }()
	want := expected("default", good, labels)
	var ids string
	testenv.Eventually(t, 30*time.Second, "the good container reported", func() (bool, string) {
		ids = desiredIDs(r)
		return strings.Contains(ids, want.ID), ids
	})
	if strings.Contains(ids, bad) {
		t.Errorf("the malformed container was reported: %v", ids)
	}
}

// desiredIDs lists the ids of the mappings r wants, space-separated.
func desiredIDs(r *core.Router) string {
	var ids []string
	for _, m := range r.Desired() {
		ids = append(ids, m.ID)
	}
	return strings.Join(ids, " ")
}

// TestLoopbackNATNextToCNI runs a container whose task has an eth0 (in a
// namespace the test made), with a 127.0.0.1 port, and checks the rules
// appended after the portmap-style rule in its CNI-DN chain.
func TestLoopbackNATNextToCNI(t *testing.T) {
	c := requireEngine(t)
	natNS := testenv.Netns(t)
	taskNS := testenv.Netns(t)
	testenv.RunIn(t, taskNS, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
	testenv.RunIn(t, taskNS, "ip", "addr", "add", "198.18.20.2/24", "dev", "eth0")
	testenv.RunIn(t, taskNS, "ip", "link", "set", "eth0", "up")

	id := uniqueID(fmt.Sprintf("lo-%d", seq.Add(1)))
	chain := cniutils.MustFormatChainNameWithPrefix("bridge", "default-"+id, "DN-")
	// What the CNI portmap plugin writes for -p 127.0.0.1:22601:80.
	testenv.RunIn(t, natNS, "iptables", "-t", "nat", "-N", chain)
	testenv.RunIn(t, natNS, "iptables", "-t", "nat", "-A", chain, "-d", "127.0.0.1/32", "-p", "tcp", "-m", "tcp",
		"--dport", "22601", "-j", "DNAT", "--to-destination", "198.18.20.2:80")

	wrapper, err := testenv.IptablesWrapper(t.TempDir(), natNS)
	if err != nil {
		t.Fatal(err)
	}
	sourcetest.Start(t, containerd.Name, newSource(t, loopbacknat.Options{Enabled: true, Iptables: wrapper,
		Interface: "eth0", GuestIP: "192.168.127.2"}))

	labels := portsLabel(containerd.PortEntry{HostPort: 22601, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"})
	labels[containerd.LabelNetworks] = `["bridge"]`
	if err := c.RunContainer("default", id, labels, "/var/run/netns/"+taskNS); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", id) }()

	cni := "-A " + chain + " -d 127.0.0.1/32 -p tcp -m tcp --dport 22601 -j DNAT --to-destination 198.18.20.2:80"
	ours := "-A " + chain + ` -d 192.168.127.2/32 -i eth0 -p tcp -m tcp --dport 22601 -m comment --comment "guestagent-loopback:containerd" -j DNAT --to-destination 198.18.20.2:80`
	var rules string
	testenv.Eventually(t, 30*time.Second, "the loopback NAT rule in place", func() (bool, string) {
		rules = testenv.NatRules(t, natNS)
		return strings.Contains(rules, ours), rules
	})
	if n := strings.Count(rules, loopbacknat.CommentPrefix); n != 1 {
		t.Errorf("%d loopback NAT rules, want the one in CNI's chain:\n%s", n, rules)
	}
	if strings.Index(rules, ours) < strings.Index(rules, cni) {
		t.Errorf("our rule precedes CNI's:\n%s", rules)
	}
	if err := c.StopContainer("default", id); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "the loopback NAT rules gone after the exit", func() (bool, string) {
		rules := testenv.NatRules(t, natNS)
		return !strings.Contains(rules, loopbacknat.CommentPrefix), rules
	})
}

func nsCtx(ctx context.Context, ns string) context.Context { return namespaces.WithNamespace(ctx, ns) }

// TestSocketAbsentAtStart starts the source before its socket exists.
func TestSocketAbsentAtStart(t *testing.T) {
	c := requireEngine(t)
	link := filepath.Join(t.TempDir(), "later.sock")
	obs, logs := observer.New(zapcore.DebugLevel)
	s, err := containerd.New(containerd.Config{Socket: link,
		Backoff: core.Backoff{Initial: 20 * time.Millisecond, Max: 200 * time.Millisecond}, Log: zap.New(obs)})
	if err != nil {
		t.Fatal(err)
	}
	id := uniqueID(fmt.Sprintf("late-%d", seq.Add(1)))
	labels := labelsFor(0, 22700)
	if err := c.RunContainer("default", id, labels, ""); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.RemoveContainer("default", id) }()
	r := sourcetest.Start(t, containerd.Name, s)
	testenv.Eventually(t, 30*time.Second, "several failed attempts", func() (bool, string) {
		n := logs.FilterMessage("containerd still not reachable").Len()
		return n >= 3, fmt.Sprintf("%d repeated failures logged", n)
	})
	if len(r.Desired()) != 0 {
		t.Fatal("reported containers without a daemon")
	}
	if err := os.Symlink(c.Socket, link); err != nil {
		t.Fatal(err)
	}
	want := containerd.ID("default", id)
	testenv.Eventually(t, 30*time.Second, "only "+want+" reported", func() (bool, string) {
		ds := r.Desired()
		return len(ds) == 1 && ds[0].ID == want, fmt.Sprint(ds)
	})
}

// uniqueID makes a container id unique on the machine: runc keeps its state
// under /run/containerd/runc whatever containerd's own directories are.
func uniqueID(id string) string { return fmt.Sprintf("%s-%d", id, os.Getpid()) }
