package iptables_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/iptables"
)

var lo = netip.MustParseAddr("127.0.0.1")

// rig is a network namespace, a wrapper that runs an iptables command in
// it (to write rules), and a source that scans it, given the namespace
// alone.
type rig struct {
	ns      string
	wrapper string
	// commands, if set, are the source's --iptablesCommands.
	commands []string
}

func newRig(t testing.TB, command string) *rig {
	t.Helper()
	ns := testenv.Netns(t)
	if _, err := exec.LookPath(command); err != nil {
		testenv.Missing(t, command)
	}
	path := filepath.Join(t.TempDir(), command+"-"+ns)
	script := "#!/bin/sh\nexec " + strings.Join(testenv.InNetns(ns, command), " ") + " \"$@\"\n"
	if err := writeExec(path, script); err != nil {
		t.Fatal(err)
	}
	return &rig{ns: ns, wrapper: path}
}

func (r *rig) source(t testing.TB, listen bool, interval time.Duration) core.Source {
	t.Helper()
	s, err := iptables.New(iptables.Config{
		Commands: r.commands, Interval: interval, NoListeners: !listen, Netns: "/var/run/netns/" + r.ns, ListenAddr: lo,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (r *rig) run(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command(r.wrapper, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// runLenient runs a removal that may find nothing to remove (after a flush).
func (r *rig) runLenient(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(r.wrapper, args...).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Bad rule") && !strings.Contains(string(out), "No chain") {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (r *rig) nft(t testing.TB, args ...string) {
	t.Helper()
	testenv.RunIn(t, r.ns, append([]string{"nft"}, args...)...)
}

var seq atomic.Int64

func mappingFor(proto core.Protocol, port int) core.Mapping {
	return core.Mapping{
		Key:   core.Key{ID: fmt.Sprintf("%s/%d", proto, port)},
		Ports: []core.Port{{Protocol: proto, ContainerPort: uint16(port), HostIP: lo, HostPort: uint16(port)}},
	}
}

// kubeProxyRules are the rules iptables-mode kube-proxy writes for one
// service, NodePort (variant 0) or LoadBalancer (variant 1), or a plain
// ClusterIP service (NoPorts).
func kubeProxyRules(name string, variant, port int) [][]string {
	h := strings.ToUpper(fmt.Sprintf("%016x", port))
	comment := "default/" + name + ":http"
	svc := [][]string{
		{"-t", "nat", "-N", "KUBE-SVC-" + h},
		{"-t", "nat", "-N", "KUBE-SEP-" + h},
		{"-t", "nat", "-A", "KUBE-SEP-" + h, "-p", "tcp", "-m", "comment", "--comment", comment, "-m", "tcp", "-j", "DNAT", "--to-destination", "198.18.100.5:8080"},
		{"-t", "nat", "-A", "KUBE-SVC-" + h, "-m", "comment", "--comment", comment + " -> 198.18.100.5:8080", "-j", "KUBE-SEP-" + h},
		{"-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "198.18.192.10/32", "-p", "tcp", "-m", "comment", "--comment", comment + " cluster IP", "-m", "tcp", "--dport", "80", "-j", "KUBE-SVC-" + h},
	}
	if variant == sourcetest.NoPorts {
		return svc
	}
	ext := [][]string{
		{"-t", "nat", "-N", "KUBE-EXT-" + h},
		{"-t", "nat", "-A", "KUBE-EXT-" + h, "-j", "KUBE-SVC-" + h},
	}
	if variant == 0 {
		ext = append(ext, []string{"-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "comment", "--comment", comment, "-m", "tcp", "--dport", fmt.Sprint(port), "-j", "KUBE-EXT-" + h})
	} else {
		ext = append(ext, []string{"-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "198.18.200.1/32", "-p", "tcp", "-m", "comment", "--comment", comment + " loadbalancer IP", "-m", "tcp", "--dport", fmt.Sprint(port), "-j", "KUBE-EXT-" + h})
	}
	return append(svc, ext...)
}

// undo turns the rule-writing commands into the commands that remove them.
func undo(cmds [][]string) [][]string {
	var rules, chains [][]string
	for _, c := range cmds {
		switch c[2] {
		case "-A":
			rules = append(rules, append([]string{"-t", "nat", "-D"}, c[3:]...))
		case "-I": // -I CHAIN 1 spec...
			rules = append(rules, append([]string{"-t", "nat", "-D", c[3]}, c[5:]...))
		case "-N":
			chains = append(chains, []string{"-t", "nat", "-X", c[3]})
		}
	}
	for i, j := 0, len(rules)-1; i < j; i, j = i+1, j-1 {
		rules[i], rules[j] = rules[j], rules[i]
	}
	return append(rules, chains...)
}

func (r *rig) base(t *testing.T) {
	r.run(t, "-t", "nat", "-N", "KUBE-SERVICES")
	r.run(t, "-t", "nat", "-N", "KUBE-NODEPORTS")
	r.run(t, "-t", "nat", "-N", "KUBE-MARK-MASQ")
	r.run(t, "-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--set-xmark", "0x4000/0x4000")
	r.run(t, "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES")
	r.run(t, "-t", "nat", "-A", "KUBE-SERVICES", "-m", "comment", "--comment", "kubernetes service nodeports; NOTE: this must be the last rule in this chain", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS")
}

func TestContractIptablesNft(t *testing.T)    { runIptablesContract(t, "iptables-nft") }
func TestContractIptablesLegacy(t *testing.T) { runIptablesContract(t, "iptables-legacy") }

func runIptablesContract(t *testing.T, command string) {
	r := newRig(t, command)
	r.base(t)
	written := map[string][][]string{}
	write := func(t *testing.T, id string, cmds [][]string) {
		for _, c := range cmds {
			r.run(t, c...)
		}
		written[id] = cmds
	}
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source { return r.source(t, true, 200*time.Millisecond) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			port := 30000 + int(seq.Add(1))
			m := mappingFor(core.TCP, port)
			if variant == sourcetest.NoPorts {
				m.Ports = nil
			}
			write(t, m.ID, kubeProxyRules(name, variant, port))
			return m
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			for _, c := range undo(written[m.ID]) {
				r.runLenient(t, c...)
			}
			delete(written, m.ID)
		},
		Repeat: func(t *testing.T, m core.Mapping) {
			// A second rule for the same port (older kube-proxies wrote a
			// KUBE-SVC jump beside the KUBE-EXT one).
			port := strings.TrimPrefix(m.ID, "tcp/")
			cmd := []string{"-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "tcp", "--dport", port, "-j", "KUBE-MARK-MASQ"}
			r.run(t, cmd...)
			written[m.ID] = append(written[m.ID], cmd)
		},
		Outage: func(t *testing.T, during func()) {
			// kube-proxy restarting: its chains are flushed, then rewritten.
			r.run(t, "-t", "nat", "-F", "KUBE-NODEPORTS")
			during()
			for _, cmds := range written {
				for _, c := range cmds {
					if c[2] == "-A" && c[3] == "KUBE-NODEPORTS" {
						r.run(t, c...)
					}
				}
			}
		},
	})
}

func TestContractNftables(t *testing.T) {
	r := newRig(t, "iptables-nft")
	if _, err := exec.LookPath("nft"); err != nil {
		testenv.Missing(t, "nft")
	}
	r.nft(t, "add", "table", "ip", "kube-proxy")
	r.nft(t, "add", "map", "ip", "kube-proxy", "service-nodeports", "{ type inet_proto . inet_service : verdict ; }")
	r.nft(t, "add", "map", "ip", "kube-proxy", "service-ips", "{ type ipv4_addr . inet_proto . inet_service : verdict ; }")
	elems := map[string]string{}
	sourcetest.Run(t, sourcetest.Harness{
		// A long interval: changes must be picked up through notifications.
		New: func(t *testing.T) core.Source { return r.source(t, true, time.Hour) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			n := int(seq.Add(1))
			port := 31000 + n
			chain := fmt.Sprintf("external-%08X-default/%s/tcp/http", n, name)
			r.nft(t, "add", "chain", "ip", "kube-proxy", chain)
			m := mappingFor(core.TCP, port)
			var el string
			switch variant {
			case sourcetest.NoPorts:
				m.Ports = nil
				svc := fmt.Sprintf("service-%08X-default/%s/tcp/http", n, name)
				r.nft(t, "add", "chain", "ip", "kube-proxy", svc)
				r.nft(t, "add", "element", "ip", "kube-proxy", "service-ips", fmt.Sprintf("{ 198.18.192.%d . tcp . 80 : goto %s }", n%250+1, svc))
				return m
			case 0:
				el = fmt.Sprintf("service-nodeports { tcp . %d : goto %s }", port, chain)
			default:
				el = fmt.Sprintf("service-ips { 198.18.200.%d . tcp . %d : goto %s }", n%250+1, port, chain)
			}
			args := append([]string{"add", "element", "ip", "kube-proxy"}, strings.SplitN(el, " ", 2)...)
			r.nft(t, args...)
			elems[m.ID] = el
			return m
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			el, ok := elems[m.ID]
			if !ok {
				return
			}
			name, rest, _ := strings.Cut(el, " ")
			delete(elems, m.ID)
			// The element may be gone already (a flush during an outage).
			argv := testenv.InNetns(r.ns, "nft", "delete", "element", "ip", "kube-proxy", name, strings.Split(rest, " : ")[0]+" }")
			if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil && !strings.Contains(string(out), "No such file") {
				t.Fatalf("nft delete element: %v: %s", err, out)
			}
		},
		Outage: func(t *testing.T, during func()) {
			// kube-proxy restarting: the maps are flushed and refilled.
			r.nft(t, "flush", "map", "ip", "kube-proxy", "service-nodeports")
			r.nft(t, "flush", "map", "ip", "kube-proxy", "service-ips")
			during()
			for _, el := range elems {
				name, rest, _ := strings.Cut(el, " ")
				r.nft(t, "add", "element", "ip", "kube-proxy", name, rest)
			}
		},
	})
}

// TestFixturesInNamespaces loads the rule dumps in testdata into fresh
// namespaces (iptables-nft, iptables-legacy and their ip6 variants,
// nftables) and checks what a scan finds, given the namespace alone (or,
// once, with iptables-legacy as --iptablesCommands).
func TestFixturesInNamespaces(t *testing.T) {
	fixture := filepath.Join("..", "..", "testdata", "iptables")
	tests := []struct {
		name, command string
		load          func(r *rig, t *testing.T)
		want          []string
	}{
		{"iptables-nft", "iptables-nft", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "iptables-nft-restore", filepath.Join(fixture, "kube-proxy-iptables.rules"))
		}, []string{"tcp/127.0.0.1:9090", "tcp/30081", "tcp/8088", "tcp/8443", "udp/30053"}},
		{"iptables-legacy", "iptables-legacy", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "iptables-legacy-restore", filepath.Join(fixture, "kube-proxy-iptables.rules"))
		}, []string{"tcp/127.0.0.1:9090", "tcp/30081", "tcp/8088", "tcp/8443", "udp/30053"}},
		{"iptables-legacy given as a command, run in the namespace", "iptables-legacy", func(r *rig, t *testing.T) {
			r.commands = []string{"iptables-legacy"}
			testenv.RunIn(t, r.ns, "iptables-legacy-restore", filepath.Join(fixture, "kube-proxy-iptables.rules"))
		}, []string{"tcp/127.0.0.1:9090", "tcp/30081", "tcp/8088", "tcp/8443", "udp/30053"}},
		{"ip6tables-legacy", "ip6tables-legacy", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "ip6tables-legacy-restore", filepath.Join(fixture, "kube-proxy-ip6tables.rules"))
		}, []string{"tcp/[::1]:9090", "tcp/30081", "tcp/8088", "tcp/8443", "udp/30053"}},
		{"ip6tables-nft", "ip6tables-nft", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "ip6tables-nft-restore", filepath.Join(fixture, "kube-proxy-ip6tables.rules"))
		}, []string{"tcp/[::1]:9090", "tcp/30081", "tcp/8088", "tcp/8443", "udp/30053"}},
		{"CNI portmap and loopback NAT, iptables-nft", "iptables-nft", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "iptables-nft-restore", filepath.Join(fixture, "cni-portmap-loopback.rules"))
		}, []string{"tcp/127.0.0.1:9090", "tcp/8443"}},
		{"CNI portmap and loopback NAT, iptables-legacy", "iptables-legacy", func(r *rig, t *testing.T) {
			testenv.RunIn(t, r.ns, "iptables-legacy-restore", filepath.Join(fixture, "cni-portmap-loopback.rules"))
		}, []string{"tcp/127.0.0.1:9090", "tcp/8443"}},
		{"nftables", "iptables-nft", func(r *rig, t *testing.T) {
			r.nft(t, "-f", filepath.Join(fixture, "kube-proxy.nft"))
		}, []string{"tcp/30081", "tcp/8088", "udp/30053"}},
		{"nftables dump of kube-proxy v1.37.2", "iptables-nft", func(r *rig, t *testing.T) {
			r.nft(t, "-f", filepath.Join(fixture, "kube-proxy-v1.37.2.nft"))
		}, []string{"tcp/30081", "tcp/30088", "tcp/8088", "udp/30053"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t, tt.command)
			tt.load(r, t)
			router := core.NewRouter(core.RouterConfig{})
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() { done <- r.source(t, false, time.Hour).Run(ctx, router.Emitter(iptables.Name)) }()
			defer func() { cancel(); <-done }()
			want := strings.Join(sorted(tt.want), " ")
			testenv.Eventually(t, 20*time.Second, "the fixture's ports "+want, func() (bool, string) {
				var got []string
				for _, m := range router.Desired() {
					got = append(got, m.ID)
				}
				return strings.Join(sorted(got), " ") == want, fmt.Sprintf("found %v", got)
			})
		})
	}
}

// TestListeners checks that a service port gets a listener, that a port
// already taken is logged rather than fatal, and that listeners close
// with their rules.
func TestListeners(t *testing.T) {
	r := newRig(t, "iptables-nft")
	r.base(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := taken.Addr().(*net.TCPAddr).Port
	free := 32000 + int(seq.Add(1))
	for _, p := range []int{takenPort, free} {
		for _, c := range kubeProxyRules(fmt.Sprint("svc", p), 0, p) {
			r.run(t, c...)
		}
	}
	router := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.source(t, true, 100*time.Millisecond).Run(ctx, router.Emitter(iptables.Name)) }()

	addr := fmt.Sprintf("127.0.0.1:%d", free)
	testenv.Eventually(t, 20*time.Second, "a listener on "+addr, func() (bool, string) {
		return dials(addr), "nothing listens"
	})
	if len(router.Desired()) != 2 {
		t.Errorf("desired %v: the taken port must still be reported", router.Desired())
	}
	for _, c := range undo(kubeProxyRules(fmt.Sprint("svc", free), 0, free)) {
		r.run(t, c...)
	}
	testenv.Eventually(t, 20*time.Second, "the listener on "+addr+" to close", func() (bool, string) {
		return !dials(addr), "still listening"
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// dials tells whether a TCP connection to addr succeeds.
func dials(addr string) bool {
	c, err := net.Dial("tcp", addr)
	if err == nil {
		c.Close()
	}
	return err == nil
}
