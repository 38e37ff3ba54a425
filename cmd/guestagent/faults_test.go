package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	ctrd "github.com/guestagent/guestagent/sources/containerd"
	"github.com/guestagent/guestagent/sources/containerd/containerdtest"
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
	// convergeLimit bounds the wait for the peer to match the engines
	// after a fault is repaired; stableFor is how long a match must hold.
	convergeLimit = 60 * time.Second
	stableFor     = 2 * time.Second
	faultNS       = "guestagent-faults"
)

func TestMain(m *testing.M) {
	if os.Getenv(agentEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// TestFaultConvergence runs the agent as its own process against a real
// dockerd, containerd, kube-apiserver and gvproxy (behind a proxy that can
// cut connections), and in each round churns containers and services,
// injects one fault — an engine, the peer or the agent killed and
// restarted, or the sink's connections dropped mid-request — and then
// checks that gvproxy's forwards match what the engines say is running,
// with nothing lost and nothing leaked.
func TestFaultConvergence(t *testing.T) {
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
	if d, lost, leaked := b.converge(); lost+leaked > 0 {
		t.Fatalf("initial state never converged: %d lost, %d leaked", lost, leaked)
	} else {
		t.Logf("initial convergence in %v", d.Round(time.Millisecond))
	}

	type tally struct {
		rounds       int
		maxConverge  time.Duration
		lost, leaked int
	}
	byKind := map[string]*tally{}
	var totalLost, totalLeaked int
	for i := range rounds {
		f := faults[i%len(faults)]
		b.churn(true, true, true)
		f.inject(b)
		d, lost, leaked := b.converge()
		tl := byKind[f.name]
		if tl == nil {
			tl = &tally{}
			byKind[f.name] = tl
		}
		tl.rounds++
		tl.maxConverge = max(tl.maxConverge, d)
		tl.lost += lost
		tl.leaked += leaked
		totalLost += lost
		totalLeaked += leaked
		t.Logf("round %d: %s, converged in %v (%d expected forwards)", i+1, f.name, d.Round(time.Millisecond), len(b.lastTruth))
		if lost+leaked > 0 {
			t.Errorf("round %d (%s): %d lost, %d leaked after %v\n%s", i+1, f.name, lost, leaked, convergeLimit, b.agentLogTail())
			break
		}
	}

	var sb strings.Builder
	tw := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "fault\trounds\tmax convergence\tlost\tleaked\t")
	var maxAll time.Duration
	var roundsRun int
	for _, f := range faults {
		tl := byKind[f.name]
		if tl == nil {
			continue
		}
		roundsRun += tl.rounds
		maxAll = max(maxAll, tl.maxConverge)
		fmt.Fprintf(tw, "%s\t%d\t%v\t%d\t%d\t\n", f.name, tl.rounds, tl.maxConverge.Round(time.Millisecond), tl.lost, tl.leaked)
	}
	fmt.Fprintf(tw, "all\t%d\t%v\t%d\t%d\t\n", roundsRun, maxAll.Round(time.Millisecond), totalLost, totalLeaked)
	_ = tw.Flush()
	t.Logf("fault convergence summary (%d containers and services started, %d stopped, %d connections cut):\n%s",
		b.started, b.stopped, b.proxy.cut.Load(), sb.String())

	// Shutdown removes everything the agent exposed.
	if code := b.stopAgent(); code != 0 {
		t.Errorf("agent exited %d on SIGTERM", code)
	}
	if got := b.forwards(); len(got) != 0 {
		t.Errorf("after shutdown gvproxy still forwards %v", got)
	}
}

// fault breaks one part of the system, changes the engines while it is
// broken, and repairs it.
type fault struct {
	name   string
	inject func(b *faultBed)
}

var faults = []fault{
	{"kill dockerd", func(b *faultBed) { b.killAndRestart(b.docker.Kill, b.docker.Start, true, false, false) }},
	{"kill containerd", func(b *faultBed) { b.killAndRestart(b.ctrd.Kill, b.ctrd.Start, false, true, false) }},
	{"kill apiserver", func(b *faultBed) { b.killAndRestart(b.kube.Kill, b.kube.Start, false, false, true) }},
	{"kill gvproxy", func(b *faultBed) {
		b.gv.Stop()
		b.churn(true, true, true)
		time.Sleep(time.Second)
		b.gv.Start()
	}},
	{"kill -9 agent", func(b *faultBed) {
		b.killAgent()
		b.churn(true, true, true)
		b.startAgent()
	}},
	{"cut sink connections", func(b *faultBed) {
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
	}},
}

// killAndRestart kills one engine (the one whose flag is set), changes the
// others while it is down, restarts it and changes it at once.
func (b *faultBed) killAndRestart(kill func(), start func() error, docker, containerd, kube bool) {
	b.t.Helper()
	kill()
	b.churn(!docker, !containerd, !kube)
	b.must(start())
	b.churn(docker, containerd, kube)
}

// faultBed holds the engines, the peer, the agent and what the test
// started in the engines.
type faultBed struct {
	t      testing.TB
	dir    string
	rng    *rand.Rand
	docker *testenv.Dockerd
	ctrd   *containerdtest.Containerd
	kube   *apiservertest.Server
	gv     *gvproxytest.Gvproxy
	proxy  *cuttingProxy

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
	lastTruth        []string
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
	wg.Go(func() { b.docker, dockerErr = testenv.StartDockerd(filepath.Join(b.dir, "docker")) })
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
	b.gv = gvproxytest.Start(t)
	b.proxy = newCuttingProxy(t, b.gv.URL())
	t.Cleanup(func() {
		if b.agent != nil {
			_ = b.agent.Process.Kill()
			<-b.agentDone
		}
	})
	return b
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

// dockerRun starts a container publishing port 80 on 127.0.0.1 or 0.0.0.0
// (inside dockerd's namespace; the agent's non-admin mode forwards both
// from the host's loopback).
func (b *faultBed) dockerRun() string {
	name := fmt.Sprintf("fault%d", b.next())
	ip := []string{"127.0.0.1", "0.0.0.0"}[b.rng.IntN(2)]
	_, err := b.docker.Docker("run", "-d", "--name", name, "-p", fmt.Sprintf("%s:%d:80", ip, b.hostPort(20000, 29999)), testenv.WebImage)
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

var dockerPublished = regexp.MustCompile(`:(\d+)->\d+/(tcp|udp)`)

// truth is what the engines say should be forwarded, as "proto local": the
// non-admin mode binds everything on 127.0.0.1.
func (b *faultBed) truth() ([]string, error) {
	var out []string
	add := func(proto string, port int) { out = append(out, fmt.Sprintf("%s 127.0.0.1:%d", proto, port)) }

	ps, err := b.docker.Docker("ps", "--format", "{{.Ports}}")
	if err != nil {
		return nil, err
	}
	for _, m := range dockerPublished.FindAllStringSubmatch(ps, -1) {
		p, _ := strconv.Atoi(m[1])
		add(m[2], p)
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
			add(e.Protocol, e.HostPort)
		}
	}

	svcs, err := b.kube.Client.CoreV1().Services("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, s := range svcs.Items {
		for _, p := range s.Spec.Ports {
			switch s.Spec.Type {
			case corev1.ServiceTypeNodePort:
				add(strings.ToLower(string(p.Protocol)), int(p.NodePort))
			case corev1.ServiceTypeLoadBalancer:
				add(strings.ToLower(string(p.Protocol)), int(p.Port))
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// forwards lists gvproxy's forwards that the agent owns, read from gvproxy
// itself (not through the proxy).
func (b *faultBed) forwards() []string { return ourForwards(b.t, b.gv.URL()) }

// converge waits until gvproxy's forwards equal the engines' truth and stay
// so for stableFor. It returns the time to the first lasting match, or, at
// convergeLimit, how many forwards were missing and how many too many.
func (b *faultBed) converge() (took time.Duration, lost, leaked int) {
	b.t.Helper()
	start := time.Now()
	var matchedAt time.Time
	for {
		want, err := b.truth()
		got := b.forwards()
		now := time.Now()
		if err == nil && slices.Equal(want, got) {
			b.lastTruth = want
			if matchedAt.IsZero() {
				matchedAt = now
			}
			if now.Sub(matchedAt) >= stableFor {
				return matchedAt.Sub(start), 0, 0
			}
		} else {
			matchedAt = time.Time{}
		}
		if now.Sub(start) > convergeLimit {
			if err != nil {
				b.t.Fatalf("reading the engines' state: %v", err)
			}
			for _, w := range want {
				if !slices.Contains(got, w) {
					lost++
					b.t.Logf("lost: %s", w)
				}
			}
			for _, g := range got {
				if !slices.Contains(want, g) {
					leaked++
					b.t.Logf("leaked: %s", g)
				}
			}
			return now.Sub(start), lost, leaked
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startAgent runs the agent as a child process: this test binary, told by
// agentEnv to run main.
func (b *faultBed) startAgent() {
	b.t.Helper()
	log, err := os.OpenFile(filepath.Join(b.dir, "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	b.must(err)
	defer log.Close()
	bin := cmp.Or(b.agentBin, os.Args[0])
	cmd := exec.Command(bin, append([]string{
		"--docker", "--dockerHost=" + b.docker.Host, "--dockerLoopbackNAT=false",
		"--containerd", "--containerdSock=" + b.ctrd.Socket, "--containerdLoopbackNAT=false",
		"--kubernetes", "--kubeconfig=" + b.kube.Kubeconfig, "--iptables=false",
		"--sinks=host-switch", "--hostSwitchURL=" + b.proxy.URL, "--hostSwitchCheckInterval=1s",
		"--stateDir=" + filepath.Join(b.dir, "state")},
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
