package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
	ctrd "github.com/guestagent/guestagent/sources/containerd"
	"github.com/guestagent/guestagent/sources/containerd/containerdtest"
	"github.com/guestagent/guestagent/sources/docker/dockerdtest"
	"github.com/guestagent/guestagent/sources/kubernetes/apiservertest"
)

const (
	// agentEnv makes the test binary run the agent (main) instead of the
	// tests, so the fault suite can SIGKILL and restart a real process.
	agentEnv = "GUESTAGENT_RUN_AGENT"
	// faultRoundsEnv sets the number of fault rounds (default: one per
	// kind of fault); faultSeedEnv replays a run's random choices.
	faultRoundsEnv = "GUESTAGENT_FAULT_ROUNDS"
	faultSeedEnv   = "GUESTAGENT_FAULT_SEED"
	// convergeLimit bounds the wait for the peers to match the engines
	// after a fault is repaired; stableFor is how long a match must hold.
	convergeLimit = 60 * time.Second
	stableFor     = 2 * time.Second
	faultNS       = "guestagent-faults"
	// guestIP is the remote address of every forward the agent creates.
	guestIP = hostswitch.DefaultGuestIP
)

func TestMain(m *testing.M) {
	if os.Getenv(agentEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// TestFaultConvergence runs the agent as its own process, configured as the
// desktop app runs it (network-tunnel mode, Docker, containerd and
// Kubernetes with the NAT rule scan, loopback NAT rules, host-switch and
// wsl-proxy), against a real dockerd, containerd, kube-apiserver and
// gvproxy (behind a proxy that can cut connections) with static forwards of
// its own, and the wsl-proxy test peer. In each round it churns containers
// and services, injects one fault — an engine, a peer or the agent killed
// and restarted, the sink's connections dropped mid-request, a host port
// busy for a while — and then checks that both peers match what the
// engines say is running, with nothing lost, nothing leaked and no other
// party's forward touched.
func TestFaultConvergence(t *testing.T) {
	testenv.Integration(t)
	rounds := len(faults)
	if v := os.Getenv(faultRoundsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", faultRoundsEnv, v)
		}
		rounds = n
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(faultSeedEnv); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", faultSeedEnv, v, err)
		}
	}
	t.Logf("%d rounds, seed %d (%s=%d replays it)", rounds, seed, faultSeedEnv, seed)

	b := newFaultBed(t, seed)
	b.churn(true, true, true)
	b.startAgent()
	if res := b.converge(time.Now()); res.bad() {
		t.Fatalf("initial state never converged: %s\n%s", res, b.agentLogTail())
	} else {
		t.Logf("initial convergence in %v", res.took.Round(time.Millisecond))
	}

	type tally struct {
		rounds      int
		maxConverge time.Duration
		convergence
	}
	byKind := map[string]*tally{}
	var total convergence
	for i := range rounds {
		f := faults[i%len(faults)]
		b.churn(true, true, true)
		b.during = convergence{}
		back := f.inject(b)
		res := b.converge(back)
		res.add(b.during)
		// An agent killed while it sends leaves its message cut short,
		// which wsl-proxy drops; anywhere else it is an error.
		if n := b.wsl.Truncated(); n > b.truncated {
			if f.name != "kill -9 agent" {
				res.peerErrs += n - b.truncated
				t.Logf("wsl-proxy got %d messages cut short", n-b.truncated)
			}
			b.truncated = n
		}
		tl := byKind[f.name]
		if tl == nil {
			tl = &tally{}
			byKind[f.name] = tl
		}
		tl.rounds++
		tl.maxConverge = max(tl.maxConverge, res.took)
		tl.add(res)
		total.add(res)
		t.Logf("round %d: %s, converged %v after the repair (%d forwards, %d wsl-proxy ports expected)",
			i+1, f.name, res.took.Round(time.Millisecond), len(b.lastHostSwitch), len(b.lastWSL))
		if res.bad() {
			t.Errorf("round %d (%s, seed %d): %s\n%s", i+1, f.name, seed, res, b.agentLogTail())
			break
		}
	}

	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "fault\trounds\tmax convergence after repair\tlost\tleaked\tforeign touched\twsl-proxy errors\t")
	var maxAll time.Duration
	var roundsRun int
	for _, f := range faults {
		tl := byKind[f.name]
		if tl == nil {
			continue
		}
		roundsRun += tl.rounds
		maxAll = max(maxAll, tl.maxConverge)
		fmt.Fprintf(tw, "%s\t%d\t%v\t%d\t%d\t%d\t%d\t\n", f.name, tl.rounds, tl.maxConverge.Round(time.Millisecond), tl.lost, tl.leaked, tl.foreign, tl.peerErrs)
	}
	fmt.Fprintf(tw, "all\t%d\t%v\t%d\t%d\t%d\t%d\t\n", roundsRun, maxAll.Round(time.Millisecond), total.lost, total.leaked, total.foreign, total.peerErrs)
	_ = tw.Flush()
	t.Logf("fault convergence summary, seed %d (%d containers and services started, %d stopped, %d connections cut; "+
		"convergence is timed from the moment the broken part is back):\n%s",
		seed, b.started, b.stopped, b.proxy.cut.Load(), sb.String())

	// Shutdown removes everything the agent exposed, and nothing else.
	if code := b.stopAgent(); code != 0 {
		t.Errorf("agent exited %d on SIGTERM", code)
	}
	if got := b.forwards(); len(got) != 0 {
		t.Errorf("after shutdown gvproxy still forwards %v", got)
	}
	if n := b.checkForeign(); n > 0 {
		t.Errorf("after shutdown %d forwards of other parties are gone or changed", n)
	}
	if got := b.wsl.State(); len(got) != 0 {
		t.Errorf("after shutdown wsl-proxy still listens on %v", got)
	}
	if err := b.wsl.Err(); err != nil {
		t.Errorf("wsl-proxy peer: %v", err)
	}
	if n := b.wsl.Truncated(); n > b.truncated {
		t.Errorf("wsl-proxy got %d messages cut short after the last round", n-b.truncated)
	}
}

// fault breaks one part of the system, changes the engines while it is
// broken, repairs it and returns when the part was back.
type fault struct {
	name   string
	inject func(b *faultBed) time.Time
}

var faults = []fault{
	{"kill dockerd", func(b *faultBed) time.Time {
		return b.killAndRestart(b.docker.Kill, b.docker.Start, true, false, false)
	}},
	{"kill containerd", func(b *faultBed) time.Time {
		return b.killAndRestart(b.ctrd.Kill, b.ctrd.Start, false, true, false)
	}},
	{"kill apiserver", func(b *faultBed) time.Time {
		return b.killAndRestart(b.kube.Kill, b.kube.Start, false, false, true)
	}},
	{"kill gvproxy", func(b *faultBed) time.Time {
		b.gv.Stop()
		b.churn(true, true, true)
		time.Sleep(time.Second)
		b.gv.Start()
		back := time.Now()
		// The user's forward went with gvproxy; the user makes it again.
		b.exposeUser()
		return back
	}},
	{"restart wsl-proxy", func(b *faultBed) time.Time {
		b.wsl.Stop()
		b.churn(true, true, true)
		time.Sleep(time.Second)
		b.must(b.wsl.Start())
		return time.Now()
	}},
	{"kill -9 agent", func(b *faultBed) time.Time {
		b.killAgent()
		b.churn(true, true, true)
		b.startAgent()
		return time.Now()
	}},
	{"cut sink connections", func(b *faultBed) time.Time {
		before := b.proxy.cut.Load()
		b.proxy.cutting.Store(true)
		b.churn(true, true, true)
		deadline := time.Now().Add(10 * time.Second)
		for b.proxy.cut.Load()-before < 4 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		b.proxy.cutting.Store(false)
		if b.proxy.cut.Load() == before {
			b.t.Fatal("the proxy cut no connection: the agent sent nothing during the fault")
		}
		return time.Now()
	}},
	{"host port busy, then free", (*faultBed).busyPort},
}

// killAndRestart kills one engine (the one whose flag is set), changes the
// others while it is down, restarts it and changes it at once. It returns
// when the engine answered again.
func (b *faultBed) killAndRestart(kill func(), start func() error, docker, containerd, kube bool) time.Time {
	b.t.Helper()
	kill()
	b.churn(!docker, !containerd, !kube)
	b.must(start())
	back := time.Now()
	b.churn(docker, containerd, kube)
	return back
}

// busyPort holds a host port on this machine, where gvproxy listens, and
// starts a container publishing it (and churns the others): every other
// port must converge while that one is absent from gvproxy and shown as
// retrying, with gvproxy's error, in the agent's status. Then it frees the
// port and returns when it did.
func (b *faultBed) busyPort() time.Time {
	b.t.Helper()
	port := b.hostPort(20000, 29999)
	ip := []string{"127.0.0.1", "0.0.0.0"}[b.rng.IntN(2)]
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
	b.must(err)
	defer ln.Close()
	b.busy = fmt.Sprintf("tcp %s:%d", ip, port)
	defer func() { b.busy = "" }()
	// The churn first, so that it does not stop the container of the busy
	// port.
	b.churn(true, true, true)
	b.dockerCtrs = append(b.dockerCtrs, b.dockerPublish(ip, port))
	b.started++

	res := b.converge(time.Now())
	b.t.Logf("with %s busy the other ports converged in %v", b.busy, res.took.Round(time.Millisecond))
	b.during.add(res)
	if !res.bad() {
		if !slices.Contains(b.lastWSL, fmt.Sprintf("tcp %d", port)) {
			b.t.Fatalf("the container publishing %s is not running", b.busy)
		}
		b.checkRetrying(ip, port)
	}
	b.must(ln.Close())
	return time.Now()
}

// checkRetrying waits until the agent's status shows port as retrying at
// host-switch with gvproxy's error and a next retry.
func (b *faultBed) checkRetrying(ip string, port int) {
	b.t.Helper()
	want := netip.MustParseAddr(ip)
	var last string
	deadline := time.Now().Add(convergeLimit)
	for time.Now().Before(deadline) {
		st, err := b.status()
		if err != nil {
			last = err.Error()
			time.Sleep(100 * time.Millisecond)
			continue
		}
		last = fmt.Sprintf("no port tcp %s:%d in the status", ip, port)
		for _, ps := range st.Ports {
			if ps.Protocol != core.TCP || int(ps.HostPort) != port || ps.HostIP != want {
				continue
			}
			for _, at := range ps.Sinks {
				if at.Sink != hostswitch.Name {
					continue
				}
				if at.State == core.PortRetrying && strings.Contains(at.Error, "address already in use") && !at.NextRetry.IsZero() {
					return
				}
				last = fmt.Sprintf("host-switch: %+v", at)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.t.Errorf("the busy port tcp %s:%d is not shown as retrying with gvproxy's error at host-switch: %s", ip, port, last)
}

// status reads the agent's /status.
func (b *faultBed) status() (core.Status, error) {
	var st core.Status
	client := &http.Client{Timeout: 5 * time.Second}
	res, err := client.Get("http://" + b.statusAddr + "/status")
	if err != nil {
		return st, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET /status: %s", res.Status)
	}
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(body, &st)
}

// faultBed holds the engines, the peers, the agent and what the test
// started in the engines.
type faultBed struct {
	t      testing.TB
	dir    string
	rng    *rand.Rand
	docker *dockerdtest.Dockerd
	ctrd   *containerdtest.Containerd
	kube   *apiservertest.Server
	gv     *gvproxytest.Gvproxy
	proxy  *cuttingProxy
	wsl    *wslproxytest.Peer
	// iptables runs iptables in dockerd's namespace: the agent's loopback
	// NAT rules go there and its NAT rule scan reads there, never the
	// machine's own tables.
	iptables   string
	k8sAPIPort int
	statusAddr string
	// foreign are the forwards of other parties on gvproxy ("proto local"
	// -> remote): gvproxy's static ones and a user's, which lead to the
	// guest's same port as the agent's own do.
	foreign   map[string]string
	userLocal string

	// agentBin is the agent's binary; empty means this test binary.
	agentBin  string
	agentArgs []string // added to the agent's command line
	agent     *exec.Cmd
	agentDone chan struct{}
	agentCode int

	ports            map[int]bool // host ports handed out, never reused
	seq              int
	dockerCtrs       []string
	ctrdCtrs         []string
	services         []string
	started, stopped int
	busy             string      // "proto ip:port" held on this machine, so gvproxy cannot take it
	during           convergence // what the fault itself found while it was on
	peerErrs         int         // wsl-proxy errors counted so far
	truncated        int         // wsl-proxy messages cut short so far
	lastHostSwitch   []string
	lastWSL          []string
}

func newFaultBed(t testing.TB, seed uint64) *faultBed {
	b := &faultBed{t: t, dir: t.TempDir(), rng: rand.New(rand.NewPCG(seed, seed>>1|1)), ports: map[int]bool{}}
	for _, d := range []string{"docker", "containerd", "kube"} {
		if err := os.MkdirAll(filepath.Join(b.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	var dockerErr, ctrdErr, kubeErr error
	wg.Go(func() { b.docker, dockerErr = dockerdtest.Start(filepath.Join(b.dir, "docker")) })
	wg.Go(func() { b.ctrd, ctrdErr = containerdtest.StartContainerd(filepath.Join(b.dir, "containerd")) })
	wg.Go(func() { b.kube, kubeErr = apiservertest.Start(filepath.Join(b.dir, "kube")) })
	wg.Wait()
	t.Cleanup(func() {
		if b.docker != nil {
			b.docker.Close()
		}
		if b.ctrd != nil {
			b.ctrd.Close()
		}
		if b.kube != nil {
			b.kube.Stop()
		}
	})
	for what, err := range map[string]error{"dockerd": dockerErr, "containerd": ctrdErr, "kube-apiserver": kubeErr} {
		if err != nil {
			testenv.Missing(t, what+" ("+err.Error()+")")
		}
	}
	var err error
	if b.iptables, err = testenv.IptablesWrapper(b.dir, b.docker.Netns); err != nil {
		t.Fatal(err)
	}

	// gvproxy as host-switch runs it: its SSH forward and the Kubernetes
	// API's, on a port of their own (the test's API server listens on
	// this machine's loopback too).
	b.k8sAPIPort = b.hostPort(40000, 49999)
	api := fmt.Sprintf("127.0.0.1:%d", b.k8sAPIPort)
	b.gv = gvproxytest.Start(t, map[string]string{api: fmt.Sprintf("%s:%d", guestIP, b.k8sAPIPort)})
	b.foreign = map[string]string{}
	for local, remote := range b.gv.Static() {
		b.foreign["tcp "+local] = remote
	}
	user := b.hostPort(40000, 49999)
	b.userLocal = fmt.Sprintf("127.0.0.1:%d", user)
	b.foreign["tcp "+b.userLocal] = fmt.Sprintf("%s:%d", guestIP, user)
	b.exposeUser()
	b.proxy = newCuttingProxy(t, b.gv.URL())

	// wsl-proxy records what it gets without listening: gvproxy listens
	// on the same ports of this machine.
	b.wsl = &wslproxytest.Peer{Path: filepath.Join(b.dir, "wsl-proxy.sock"), RecordOnly: true}
	b.must(b.wsl.Start())
	t.Cleanup(b.wsl.Stop)
	b.statusAddr = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	t.Cleanup(func() {
		if b.agent != nil {
			_ = b.agent.Process.Kill()
			<-b.agentDone
		}
	})
	return b
}

// exposeUser makes the user's forward, straight on gvproxy.
func (b *faultBed) exposeUser() {
	b.t.Helper()
	b.must(b.gv.Expose("tcp", b.userLocal, b.foreign["tcp "+b.userLocal]))
}

func (b *faultBed) must(err error) {
	b.t.Helper()
	if err != nil {
		b.t.Fatal(err)
	}
}

// hostPort returns an unused port in [lo, hi] that is free on this
// machine's loopback for TCP and UDP, where gvproxy will listen.
func (b *faultBed) hostPort(lo, hi int) int {
	for range 1000 {
		p := lo + b.rng.IntN(hi-lo+1)
		if b.ports[p] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		u.Close()
		b.ports[p] = true
		return p
	}
	b.t.Fatalf("no free port in %d-%d", lo, hi)
	return 0
}

// churn starts one or two containers or services in each engine asked
// for and stops one half the time, or as many as keep six running.
func (b *faultBed) churn(docker, containerd, kube bool) {
	b.t.Helper()
	type engine struct {
		on      bool
		running *[]string
		start   func() string
		stop    func(string)
	}
	for _, e := range []engine{
		{docker, &b.dockerCtrs, b.dockerRun, b.dockerRemove},
		{containerd, &b.ctrdCtrs, b.ctrdRun, b.ctrdStop},
		{kube, &b.services, b.serviceCreate, b.serviceDelete},
	} {
		if !e.on {
			continue
		}
		for range 1 + b.rng.IntN(2) {
			*e.running = append(*e.running, e.start())
			b.started++
		}
		for first := true; len(*e.running) > 1 && (len(*e.running) > 6 || (first && b.rng.IntN(2) == 0)); first = false {
			i := b.rng.IntN(len(*e.running))
			e.stop((*e.running)[i])
			*e.running = slices.Delete(*e.running, i, i+1)
			b.stopped++
		}
	}
}

func (b *faultBed) next() int { b.seq++; return b.seq }

// dockerRun starts a container publishing port 80 on 127.0.0.1, on
// 0.0.0.0, or on every address (dockerd then reports 0.0.0.0 and [::]),
// inside dockerd's namespace.
func (b *faultBed) dockerRun() string {
	return b.dockerPublish([]string{"127.0.0.1", "0.0.0.0", ""}[b.rng.IntN(3)], b.hostPort(20000, 29999))
}

// dockerPublish starts a container publishing port 80 on ip:port (every
// address when ip is empty).
func (b *faultBed) dockerPublish(ip string, port int) string {
	name := fmt.Sprintf("fault%d", b.next())
	publish := fmt.Sprintf("%d:80", port)
	if ip != "" {
		publish = ip + ":" + publish
	}
	_, err := b.docker.Docker("run", "-d", "--name", name, "-p", publish, dockerdtest.WebImage)
	b.must(err)
	return name
}

func (b *faultBed) dockerRemove(name string) {
	_, err := b.docker.Docker("rm", "-f", name)
	b.must(err)
}

// ctrdRun starts a task whose nerdctl/ports label publishes a TCP and
// sometimes also a UDP port.
func (b *faultBed) ctrdRun() string {
	id := fmt.Sprintf("ga-fault-%d-%d", os.Getpid(), b.next())
	entries := []ctrd.PortEntry{{HostPort: b.hostPort(20000, 29999), ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"}}
	if b.rng.IntN(2) == 0 {
		entries = append(entries, ctrd.PortEntry{HostPort: b.hostPort(20000, 29999), ContainerPort: 53, Protocol: "udp", HostIP: "127.0.0.1"})
	}
	label, err := json.Marshal(entries)
	b.must(err)
	b.must(b.ctrd.RunContainer(faultNS, id, map[string]string{ctrd.LabelPorts: string(label)}, ""))
	return id
}

// ctrdStop kills the task, and half the time deletes the container too.
func (b *faultBed) ctrdStop(id string) {
	if b.rng.IntN(2) == 0 {
		b.must(b.ctrd.StopContainer(faultNS, id))
		return
	}
	b.must(b.ctrd.RemoveContainer(faultNS, id))
}

// serviceCreate makes a NodePort service, or a LoadBalancer one without
// node ports.
func (b *faultBed) serviceCreate() string {
	name := fmt.Sprintf("fault%d", b.next())
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if b.rng.IntN(2) == 0 {
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), NodePort: int32(b.hostPort(30000, 32767))}}
	} else {
		svc.Spec.Type = corev1.ServiceTypeLoadBalancer
		svc.Spec.AllocateLoadBalancerNodePorts = new(false)
		svc.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: int32(b.hostPort(20000, 29999)), TargetPort: intstr.FromInt32(80)}}
	}
	_, err := b.kube.Client.CoreV1().Services("default").Create(context.Background(), svc, metav1.CreateOptions{})
	b.must(err)
	return name
}

func (b *faultBed) serviceDelete(name string) {
	b.must(b.kube.Client.CoreV1().Services("default").Delete(context.Background(), name, metav1.DeleteOptions{}))
}

// binding is one host port the engines say is published.
type binding struct {
	proto string
	ip    netip.Addr
	port  int
}

// bindings is what the engines say should be exposed, with the addresses
// they report: in network-tunnel mode ports keep them.
func (b *faultBed) bindings() ([]binding, error) {
	var out []binding
	add := func(proto, ip string, port int) error {
		a, err := netip.ParseAddr(cmp.Or(ip, "0.0.0.0"))
		if err != nil {
			return fmt.Errorf("host address %q: %w", ip, err)
		}
		out = append(out, binding{proto, a, port})
		return nil
	}

	ids, err := b.docker.Docker("ps", "-q")
	if err != nil {
		return nil, err
	}
	if ids != "" {
		js, err := b.docker.Docker(append([]string{"inspect", "--format", "{{json .NetworkSettings.Ports}}"}, strings.Fields(ids)...)...)
		if err != nil {
			return nil, err
		}
		for line := range strings.Lines(js) {
			var pm map[string][]struct{ HostIp, HostPort string }
			if err := json.Unmarshal([]byte(line), &pm); err != nil {
				return nil, fmt.Errorf("docker inspect ports %q: %w", line, err)
			}
			for key, bs := range pm {
				_, proto, _ := strings.Cut(key, "/")
				for _, hb := range bs {
					p, err := strconv.Atoi(hb.HostPort)
					if err != nil {
						return nil, fmt.Errorf("docker inspect ports %q: %w", line, err)
					}
					if err := add(proto, hb.HostIp, p); err != nil {
						return nil, err
					}
				}
			}
		}
	}

	if b.ctrd.Client == nil {
		return nil, fmt.Errorf("containerd is not running")
	}
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), faultNS), 10*time.Second)
	defer cancel()
	ctrs, err := b.ctrd.Client.Containers(ctx)
	if err != nil {
		return nil, err
	}
	for _, c := range ctrs {
		task, err := c.Task(ctx, nil)
		if err != nil {
			continue // no task: not running
		}
		st, err := task.Status(ctx)
		if err != nil || st.Status != containerd.Running {
			continue
		}
		labels, err := c.Labels(ctx)
		if err != nil {
			return nil, err
		}
		var entries []ctrd.PortEntry
		if err := json.Unmarshal([]byte(labels[ctrd.LabelPorts]), &entries); err != nil {
			return nil, fmt.Errorf("container %s: %w", c.ID(), err)
		}
		for _, e := range entries {
			if err := add(e.Protocol, e.HostIP, e.HostPort); err != nil {
				return nil, err
			}
		}
	}

	// Services are bound at --k8sServiceListenerAddr, 127.0.0.1 by default.
	svcs, err := b.kube.Client.CoreV1().Services("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, s := range svcs.Items {
		for _, p := range s.Spec.Ports {
			proto := strings.ToLower(string(p.Protocol))
			switch s.Spec.Type {
			case corev1.ServiceTypeNodePort:
				_ = add(proto, "127.0.0.1", int(p.NodePort))
			case corev1.ServiceTypeLoadBalancer:
				_ = add(proto, "127.0.0.1", int(p.Port))
			}
		}
	}
	return out, nil
}

// expected is what each peer should hold for bs. gvproxy: every IPv4
// binding as "proto ip:port" (its API cannot take IPv6 ones), but the busy
// one. wsl-proxy: one listener per protocol and port, "proto port", on one
// of the addresses claimed for it; and the Kubernetes API port.
func (b *faultBed) expected(bs []binding) (hostSwitch []string, wsl map[string][]netip.Addr) {
	wsl = map[string][]netip.Addr{
		fmt.Sprintf("tcp %d", b.k8sAPIPort): {netip.AddrFrom4([4]byte{127, 0, 0, 1})},
	}
	for _, x := range bs {
		if x.ip.Is4() {
			if e := fmt.Sprintf("%s %s", x.proto, netip.AddrPortFrom(x.ip, uint16(x.port))); e != b.busy {
				hostSwitch = append(hostSwitch, e)
			}
		}
		k := fmt.Sprintf("%s %d", x.proto, x.port)
		if !slices.Contains(wsl[k], x.ip) {
			wsl[k] = append(wsl[k], x.ip)
		}
	}
	slices.Sort(hostSwitch)
	hostSwitch = slices.Compact(hostSwitch)
	return hostSwitch, wsl
}

// wslState reads the wsl-proxy peer's listeners as "proto port" -> address.
func (b *faultBed) wslState() map[string]netip.Addr {
	out := map[string]netip.Addr{}
	for _, e := range b.wsl.State() {
		proto, addr, _ := strings.Cut(e, " ")
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			b.t.Fatalf("wsl-proxy peer entry %q: %v", e, err)
		}
		out[fmt.Sprintf("%s %d", proto, ap.Port())] = ap.Addr()
	}
	return out
}

// diffWSL compares the peer's listeners with what is expected.
func diffWSL(want map[string][]netip.Addr, got map[string]netip.Addr) (lost, leaked []string) {
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if _, ok := got[k]; !ok {
			lost = append(lost, k)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		if addrs, ok := want[k]; !ok {
			leaked = append(leaked, fmt.Sprintf("%s on %s", k, got[k]))
		} else if !slices.Contains(addrs, got[k]) {
			leaked = append(leaked, fmt.Sprintf("%s on %s, an address no engine claims for it (%v)", k, got[k], addrs))
		}
	}
	return lost, leaked
}

// allForwards lists gvproxy's forwards as "proto local" -> remote, read
// from gvproxy itself (not through the proxy).
func (b *faultBed) allForwards() (map[string]string, error) {
	all, err := listForwards(b.gv.URL())
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(all))
	for _, f := range all {
		out[cmp.Or(f.Protocol, "tcp")+" "+f.Local] = f.Remote
	}
	return out, nil
}

// forwards lists gvproxy's forwards that the agent's could be (to the
// guest's same port), other parties' left out, as "proto local".
func (b *faultBed) forwards() []string {
	var out []string
	for _, f := range ourForwards(b.t, b.gv.URL()) {
		if _, other := b.foreign[f]; !other {
			out = append(out, f)
		}
	}
	return out
}

// checkForeign returns how many of the other parties' forwards are gone
// from gvproxy or lead elsewhere, logging each.
func (b *faultBed) checkForeign() int {
	b.t.Helper()
	all, err := b.allForwards()
	if err != nil {
		b.t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	touched := 0
	for _, k := range slices.Sorted(maps.Keys(b.foreign)) {
		if got, ok := all[k]; !ok {
			touched++
			b.t.Logf("foreign forward %s -> %s is gone", k, b.foreign[k])
		} else if got != b.foreign[k] {
			touched++
			b.t.Logf("foreign forward %s now leads to %s, not %s", k, got, b.foreign[k])
		}
	}
	return touched
}

// convergence is the outcome of one wait for the peers to match the
// engines.
type convergence struct {
	took                            time.Duration
	lost, leaked, foreign, peerErrs int
}

func (c convergence) bad() bool { return c.lost+c.leaked+c.foreign+c.peerErrs > 0 }

func (c *convergence) add(o convergence) {
	c.lost += o.lost
	c.leaked += o.leaked
	c.foreign += o.foreign
	c.peerErrs += o.peerErrs
}

func (c convergence) String() string {
	return fmt.Sprintf("%d lost, %d leaked, %d foreign forwards touched, %d wsl-proxy errors", c.lost, c.leaked, c.foreign, c.peerErrs)
}

// converge waits until gvproxy's forwards and the wsl-proxy peer's
// listeners match the engines and stay so for stableFor. It returns the
// time from since to the first lasting match, or, at convergeLimit, what
// was missing and what too many; then it checks the other parties'
// forwards and the peer's errors.
func (b *faultBed) converge(since time.Time) convergence {
	b.t.Helper()
	var res convergence
	var matchedAt time.Time
	for {
		bs, err := b.bindings()
		var wantHS []string
		var wantWSL map[string][]netip.Addr
		if err == nil {
			wantHS, wantWSL = b.expected(bs)
		}
		gotHS := b.forwards()
		gotWSL := b.wslState()
		lostWSL, leakedWSL := diffWSL(wantWSL, gotWSL)
		now := time.Now()
		if err == nil && slices.Equal(wantHS, gotHS) && len(lostWSL)+len(leakedWSL) == 0 {
			b.lastHostSwitch, b.lastWSL = wantHS, slices.Collect(maps.Keys(wantWSL))
			if matchedAt.IsZero() {
				matchedAt = now
			}
			if now.Sub(matchedAt) >= stableFor {
				res.took = matchedAt.Sub(since)
				break
			}
		} else {
			matchedAt = time.Time{}
		}
		if now.Sub(since) > convergeLimit {
			if err != nil {
				b.t.Fatalf("reading the engines' state: %v", err)
			}
			for _, w := range wantHS {
				if !slices.Contains(gotHS, w) {
					res.lost++
					b.t.Logf("lost on host-switch: %s", w)
				}
			}
			for _, g := range gotHS {
				if !slices.Contains(wantHS, g) {
					res.leaked++
					b.t.Logf("leaked on host-switch: %s", g)
				}
			}
			for _, l := range lostWSL {
				res.lost++
				b.t.Logf("lost on wsl-proxy: %s", l)
			}
			for _, l := range leakedWSL {
				res.leaked++
				b.t.Logf("leaked on wsl-proxy: %s", l)
			}
			res.took = now.Sub(since)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	res.foreign = b.checkForeign()
	if err := b.wsl.Err(); err != nil {
		n := 1
		var errs interface{ Unwrap() []error }
		if errors.As(err, &errs) {
			n = len(errs.Unwrap())
		}
		if n > b.peerErrs {
			res.peerErrs = n - b.peerErrs
			b.peerErrs = n
			b.t.Logf("wsl-proxy peer errors: %v", err)
		}
	}
	return res
}

// startAgent runs the agent as a child process (this test binary, told by
// agentEnv to run main) with the desktop app's configuration; the state
// directory outlives every kill.
func (b *faultBed) startAgent() {
	b.t.Helper()
	log, err := os.OpenFile(filepath.Join(b.dir, "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	b.must(err)
	defer log.Close()
	bin := cmp.Or(b.agentBin, os.Args[0])
	netns := "/var/run/netns/" + b.docker.Netns
	cmd := exec.Command(bin, append([]string{
		"--adminInstall",
		"--docker", "--dockerHost=" + b.docker.Host, "--dockerIptables=" + b.iptables,
		"--containerd", "--containerdSock=" + b.ctrd.Socket, "--containerdIptables=" + b.iptables,
		"--kubernetes", "--kubeconfig=" + b.kube.Kubeconfig, fmt.Sprintf("--k8sAPIPort=%d", b.k8sAPIPort),
		"--iptables", "--iptablesNetns=" + netns,
		"--sockets", "--socketsNetns=" + netns, // the guest's sockets: docker-proxy's, never reported
		"--hostSwitchURL=" + b.proxy.URL,
		"--wslProxySocket=" + b.wsl.Path,
		"--stateDir=" + filepath.Join(b.dir, "state"), "--controlSocket=" + filepath.Join(b.dir, "ctl.sock"),
		"--statusAddr=" + b.statusAddr},
		b.agentArgs...)...)
	cmd.Env = append(os.Environ(), agentEnv+"=1")
	cmd.Stdout, cmd.Stderr = log, log
	b.must(cmd.Start())
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		b.agentCode = cmd.ProcessState.ExitCode()
		close(done)
	}()
	b.agent, b.agentDone = cmd, done
}

// killAgent kills the agent with SIGKILL: it cleans nothing up.
func (b *faultBed) killAgent() {
	_ = b.agent.Process.Kill()
	<-b.agentDone
	b.agent = nil
}

// stopAgent stops the agent with SIGTERM and returns its exit code.
func (b *faultBed) stopAgent() int {
	_ = b.agent.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.agentDone:
	case <-time.After(60 * time.Second):
		b.t.Error("agent did not exit within 60s of SIGTERM")
		_ = b.agent.Process.Kill()
		<-b.agentDone
	}
	b.agent = nil
	return b.agentCode
}

func (b *faultBed) agentLogTail() string {
	out, _ := os.ReadFile(filepath.Join(b.dir, "agent.log"))
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return "agent log:\n" + strings.Join(lines, "\n")
}

// cuttingProxy passes the agent's forwarder API requests to gvproxy. While
// cutting is set it breaks them in turn: one connection is closed before
// the request reaches gvproxy, the next after gvproxy applied it but before
// the answer, the third passes.
type cuttingProxy struct {
	URL      string
	upstream *url.URL
	rp       *httputil.ReverseProxy
	cutting  atomic.Bool
	n, cut   atomic.Int64
}

func newCuttingProxy(t testing.TB, upstream string) *cuttingProxy {
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	p := &cuttingProxy{upstream: u, rp: httputil.NewSingleHostReverseProxy(u)}
	// With gvproxy down the agent must see what it would see without the
	// proxy, a failed connection, not a 502 from the proxy.
	p.rp.ErrorHandler = func(w http.ResponseWriter, _ *http.Request, _ error) { hangUp(w) }
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	p.URL = srv.URL
	return p
}

func (p *cuttingProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !p.cutting.Load() {
		p.rp.ServeHTTP(w, r)
		return
	}
	switch p.n.Add(1) % 3 {
	case 0:
		p.drop(w)
	case 1:
		req, err := http.NewRequestWithContext(r.Context(), r.Method, p.upstream.String()+r.URL.Path, r.Body)
		if err == nil {
			req.Header = r.Header.Clone()
			if res, err := http.DefaultClient.Do(req); err == nil {
				res.Body.Close()
			}
		}
		p.drop(w)
	default:
		p.rp.ServeHTTP(w, r)
	}
}

// drop closes the client's connection without an answer, and counts it.
func (p *cuttingProxy) drop(w http.ResponseWriter) {
	hangUp(w)
	p.cut.Add(1)
}

// hangUp closes the client's connection without an answer.
func hangUp(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}
