package kubernetes_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/kubernetes"
)

var lo = netip.MustParseAddr("127.0.0.1")

var seq atomic.Int64

// service builds a service of type typ with one port per entry of ports
// (port, node port); uid is set as the API server would.
func service(name string, typ corev1.ServiceType, ports ...[2]int32) *corev1.Service {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec:       corev1.ServiceSpec{Type: typ},
	}
	for i, p := range ports {
		proto := corev1.ProtocolTCP
		if i == 1 {
			proto = corev1.ProtocolUDP
		}
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: fmt.Sprint("p", i), Protocol: proto, Port: p[0], NodePort: p[1]})
	}
	return svc
}

// variantService is the suite's workload: a NodePort service with a tcp
// and a udp port (variant 0), a LoadBalancer service (variant 1), or a
// ClusterIP service, which exposes nothing (NoPorts).
func variantService(name string, variant int) *corev1.Service {
	n := int32(seq.Add(1))
	switch variant {
	case sourcetest.NoPorts:
		return service(fmt.Sprint(name, n), corev1.ServiceTypeClusterIP, [2]int32{80, 0})
	case 0:
		return service(fmt.Sprint(name, n), corev1.ServiceTypeNodePort, [2]int32{80, 30000 + n}, [2]int32{53, 30100 + n})
	default:
		return service(fmt.Sprint(name, n), corev1.ServiceTypeLoadBalancer, [2]int32{8000 + n, 30200 + n})
	}
}

// lite is what the source decodes of svc: svc's JSON, as the API server
// sends it, decoded into the source's Service.
func lite(svc *corev1.Service) *kubernetes.Service {
	data, err := json.Marshal(svc)
	if err != nil {
		panic(err)
	}
	var out kubernetes.Service
	if err := json.Unmarshal(data, &out); err != nil {
		panic(err)
	}
	return &out
}

func expect(svc *corev1.Service) core.Mapping {
	m, _ := kubernetes.Convert(lite(svc), lo)
	m.Source = ""
	return m
}

// fakeCluster serves a fake clientset as the source's Client: its lists
// and watches of services pass each object through its JSON form.
type fakeCluster struct{ cs *fake.Clientset }

func (f fakeCluster) Services() cache.ListerWatcher { return fakeServices(f) }

func (f fakeCluster) Identity(ctx context.Context) (string, error) {
	ns, err := f.cs.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return string(ns.UID), nil
}

type fakeServices struct{ cs *fake.Clientset }

func (f fakeServices) List(opts metav1.ListOptions) (runtime.Object, error) {
	l, err := f.cs.CoreV1().Services(metav1.NamespaceAll).List(context.Background(), opts)
	if err != nil {
		return nil, err
	}
	out := &kubernetes.ServiceList{ListMeta: l.ListMeta}
	for i := range l.Items {
		out.Items = append(out.Items, *lite(&l.Items[i]))
	}
	return out, nil
}

func (f fakeServices) Watch(opts metav1.ListOptions) (watch.Interface, error) {
	w, err := f.cs.CoreV1().Services(metav1.NamespaceAll).Watch(context.Background(), opts)
	if err != nil {
		return nil, err
	}
	return watch.Filter(w, func(e watch.Event) (watch.Event, bool) {
		if svc, ok := e.Object.(*corev1.Service); ok {
			e.Object = lite(svc)
		}
		return e, true
	}), nil
}

// IsWatchListSemanticsUnSupported tells the informer that the fake
// clientset cannot stream its initial list as watch events.
func (fakeServices) IsWatchListSemanticsUnSupported() bool { return true }

func fakeSource(t testing.TB, cs *fake.Clientset) core.Source {
	return newSource(t, kubernetes.Config{
		NewClient:  func([]byte) (kubernetes.Client, error) { return fakeCluster{cs}, nil },
		Check:      20 * time.Millisecond,
		ListenAddr: lo,
	})
}

func TestContractFakeClientset(t *testing.T) {
	cs := fake.NewClientset()
	ctx := context.Background()
	svcs := cs.CoreV1().Services("default")
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source { return fakeSource(t, cs) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			svc := variantService(name, variant)
			if _, err := svcs.Create(ctx, svc, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			return expect(svc)
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			if err := svcs.Delete(ctx, string(m.ID)[len("uid-"):], metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		},
		Update: func(t *testing.T, m core.Mapping, variant int) core.Mapping {
			svc, err := svcs.Get(ctx, string(m.ID)[len("uid-"):], metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			n := int32(seq.Add(1))
			// A type change: NodePort to LoadBalancer, ports move.
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.Ports = []corev1.ServicePort{{Name: "p0", Protocol: corev1.ProtocolTCP, Port: 9000 + n, NodePort: 30300 + n}}
			if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			return expect(svc)
		},
		Repeat: func(t *testing.T, m core.Mapping) {
			svc, err := svcs.Get(ctx, string(m.ID)[len("uid-"):], metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			svc.Labels = map[string]string{"touched": fmt.Sprint(seq.Add(1))} // an update that changes no port
			if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		},
	})
}

// controlledWatches lets a test end the informer's watch, as an API server
// does when a watch expires; the informer then relists.
type controlledWatches struct {
	mu      sync.Mutex
	watches []watch.Interface
}

func (c *controlledWatches) install(cs *fake.Clientset) {
	tracker := cs.Tracker()
	cs.PrependWatchReactor("services", func(action k8stesting.Action) (bool, watch.Interface, error) {
		w, err := tracker.Watch(action.GetResource(), action.GetNamespace())
		if err != nil {
			return true, nil, err
		}
		c.mu.Lock()
		c.watches = append(c.watches, w)
		c.mu.Unlock()
		return true, w, nil
	})
}

func (c *controlledWatches) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.watches)
}

func (c *controlledWatches) expire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.watches {
		w.Stop()
	}
	c.watches = nil
}

// TestRelistAfterWatchExpiry changes services while no watch is open and
// checks that the relist delivers the removal and the new service once,
// and re-adds nothing that was already there.
func TestRelistAfterWatchExpiry(t *testing.T) {
	cs := fake.NewClientset(service("kept", corev1.ServiceTypeNodePort, [2]int32{80, 31001}), service("gone", corev1.ServiceTypeNodePort, [2]int32{80, 31002}))
	cw := &controlledWatches{}
	cw.install(cs)
	sink := &countingSink{}
	r := core.NewRouter(core.RouterConfig{})
	r.AddSink("count", sink, nil)
	ctx, cancel := context.WithCancel(t.Context())
	rdone := make(chan error, 1)
	go func() { rdone <- r.Run(ctx) }()
	done := make(chan error, 1)
	src := fakeSource(t, cs)
	go func() { done <- src.Run(ctx, r.Emitter(kubernetes.Name)) }()
	defer func() { cancel(); <-done; <-rdone }()

	testenv.Eventually(t, waitTimeout, "two services and a watch", func() (bool, string) {
		return len(r.Desired()) == 2 && cw.count() > 0, fmt.Sprintf("%s, %d watches", desired(r), cw.count())
	})
	waitQuiet(t, sink, 2)
	cw.expire()
	// While the watch is down: one service goes, one comes, without events.
	tracker := cs.Tracker()
	gvr := corev1.SchemeGroupVersion.WithResource("services")
	if err := tracker.Delete(gvr, "default", "gone"); err != nil {
		t.Fatal(err)
	}
	if err := tracker.Create(gvr, service("new", corev1.ServiceTypeLoadBalancer, [2]int32{8080, 31003}), "default"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, waitTimeout, "the relist", func() (bool, string) {
		ids := ""
		for _, m := range r.Desired() {
			ids += m.ID + " "
		}
		return ids == "uid-kept uid-new ", "desired ids " + ids
	})
	waitQuiet(t, sink, 4)
	if adds, removes := sink.counts(); adds != 3 || removes != 1 {
		t.Errorf("adds %d removes %d; want 3 adds (kept, gone, new) and 1 remove", adds, removes)
	}
}

func TestKubeconfigAppearsLaterAndChanges(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/k3s.yaml"
	clusters := map[string]*fake.Clientset{
		"one": fake.NewClientset(service("a", corev1.ServiceTypeNodePort, [2]int32{80, 31101})),
		"two": fake.NewClientset(service("b", corev1.ServiceTypeNodePort, [2]int32{80, 31102})),
	}
	src := newSource(t, kubernetes.Config{
		Path:  path,
		Check: 20 * time.Millisecond,
		NewClient: func(data []byte) (kubernetes.Client, error) {
			cs, ok := clusters[string(data)]
			if !ok {
				return nil, fmt.Errorf("unknown cluster %q", data)
			}
			return fakeCluster{cs}, nil
		},
		ListenAddr: lo,
	})
	r := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r.Emitter(kubernetes.Name)) }()
	defer func() { cancel(); <-done }()
	time.Sleep(100 * time.Millisecond)
	if len(r.Desired()) != 0 {
		t.Fatal("services without a kubeconfig")
	}
	write := func(s string) {
		if err := writeFile(path, s); err != nil {
			t.Fatal(err)
		}
	}
	write("one")
	testenv.Eventually(t, waitTimeout, "cluster one", func() (bool, string) { d := r.Desired(); return len(d) == 1 && d[0].ID == "uid-a", desired(r) })
	write("garbage")
	time.Sleep(100 * time.Millisecond)
	if d := r.Desired(); len(d) != 1 || d[0].ID != "uid-a" {
		t.Errorf("an unusable kubeconfig dropped the services: %v", d)
	}
	write("two")
	testenv.Eventually(t, waitTimeout, "cluster two replacing one", func() (bool, string) { d := r.Desired(); return len(d) == 1 && d[0].ID == "uid-b", desired(r) })
}

func TestConvert(t *testing.T) {
	tests := []struct {
		svc  *corev1.Service
		want string
	}{
		{service("np", corev1.ServiceTypeNodePort, [2]int32{80, 30080}, [2]int32{53, 30053}), "127.0.0.1:30080->30080/tcp 127.0.0.1:30053->30053/udp"},
		{service("lb", corev1.ServiceTypeLoadBalancer, [2]int32{8080, 30081}), "127.0.0.1:8080->8080/tcp"},
		{service("cip", corev1.ServiceTypeClusterIP, [2]int32{80, 0}), ""},
		{service("ext", corev1.ServiceTypeExternalName), ""},
		{service("np-unallocated", corev1.ServiceTypeNodePort, [2]int32{80, 0}), ""},
	}
	sctp := service("sctp", corev1.ServiceTypeNodePort, [2]int32{80, 30090})
	sctp.Spec.Ports[0].Protocol = corev1.ProtocolSCTP
	tests = append(tests, struct {
		svc  *corev1.Service
		want string
	}{sctp, "127.0.0.1:30090->30090/sctp"})
	for _, tt := range tests {
		m, _ := kubernetes.Convert(lite(tt.svc), lo)
		var got string
		for i, p := range m.Ports {
			if i > 0 {
				got += " "
			}
			got += p.String()
		}
		if got != tt.want && !sameSet(got, tt.want) {
			t.Errorf("%s: %q, want %q", tt.svc.Name, got, tt.want)
		}
		if m.ID != string(tt.svc.UID) {
			t.Errorf("%s: id %q", tt.svc.Name, m.ID)
		}
	}
}

var _ runtime.Object = (*kubernetes.Service)(nil)

// TestClusterIPServicesAreNoted checks that services exposing nothing are
// kept as notes (at the first list and on later events) and forgotten when
// they become exposed or go, so that explain can name them.
func TestClusterIPServicesAreNoted(t *testing.T) {
	cs := fake.NewClientset(service("listed", corev1.ServiceTypeClusterIP, [2]int32{80, 0}))
	r := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	src := fakeSource(t, cs)
	go func() { done <- src.Run(ctx, r.Emitter(kubernetes.Name)) }()
	defer func() { cancel(); <-done }()
	notes := func() string {
		var out []string
		for _, n := range r.Status().Notes {
			out = append(out, fmt.Sprintf("%s %s %d/%s", n.Key, n.What, n.Ports[0].ContainerPort, n.Ports[0].Protocol))
		}
		return strings.Join(out, ", ")
	}
	testenv.Eventually(t, waitTimeout, "the listed ClusterIP service noted", func() (bool, string) {
		return notes() == "kubernetes/uid-listed Kubernetes service default/listed 80/tcp", "notes: " + notes()
	})
	if n := r.Status().Notes[0]; !strings.Contains(n.Reason, "type ClusterIP") {
		t.Errorf("reason %q does not name the type", n.Reason)
	}
	services := cs.CoreV1().Services("default")
	if _, err := services.Create(ctx, service("later", corev1.ServiceTypeClusterIP, [2]int32{8080, 0}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, waitTimeout, "a created ClusterIP service noted", func() (bool, string) {
		return strings.Contains(notes(), "default/later 8080/tcp"), "notes: " + notes()
	})
	if _, err := services.Update(ctx, service("listed", corev1.ServiceTypeNodePort, [2]int32{80, 31080}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, waitTimeout, "the note gone once the service is exposed", func() (bool, string) {
		return notes() == "kubernetes/uid-later Kubernetes service default/later 8080/tcp" && len(r.Desired()) == 1,
			"notes: " + notes() + "; " + desired(r)
	})
	if err := services.Delete(ctx, "later", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, waitTimeout, "the note gone with the service", func() (bool, string) { return notes() == "", "notes: " + notes() })
}

// TestConvertSaysWhatItSkips checks that the ports Convert leaves out are
// named with the reason, not dropped in silence.
func TestConvertSaysWhatItSkips(t *testing.T) {
	svc := &kubernetes.Service{}
	svc.UID = "u1"
	svc.Spec.Type = kubernetes.TypeNodePort
	svc.Spec.Ports = []kubernetes.ServicePort{
		{Name: "web", Protocol: "TCP", Port: 80, NodePort: 30080},
		{Name: "big", Protocol: "TCP", Port: 81, NodePort: 70000},
		{Name: "odd", Protocol: "QUIC", Port: 82, NodePort: 30082},
	}
	m, skipped := kubernetes.Convert(svc, lo)
	if len(m.Ports) != 1 || m.Ports[0].HostPort != 30080 {
		t.Errorf("ports %v, want 30080 alone", m.Ports)
	}
	var msgs []string
	for _, err := range skipped {
		msgs = append(msgs, err.Error())
	}
	got := strings.Join(msgs, "; ")
	if len(skipped) != 2 || !strings.Contains(got, `port "big": host port 70000 is out of range`) || !strings.Contains(got, `port "odd"`) {
		t.Errorf("skipped: %s", got)
	}
}

// TestNewRejectsANegativeInterval checks that New's error names the flag
// and the value, and that a zero Config is the defaults.
func TestNewRejectsANegativeInterval(t *testing.T) {
	fakeClient := func([]byte) (kubernetes.Client, error) { return fakeCluster{fake.NewClientset()}, nil }
	tests := []struct {
		name    string
		cfg     kubernetes.Config
		wantErr string
	}{
		{"negative interval", kubernetes.Config{NewClient: fakeClient, Check: -time.Second}, "--kubeconfigCheckInterval must be positive, got -1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := kubernetes.New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New(%+v) = %v, want an error mentioning %q", tt.cfg, err, tt.wantErr)
			}
		})
	}
	for _, cfg := range []kubernetes.Config{
		{},
		{Path: kubernetes.DefaultKubeconfig, Check: time.Second},
		{NewClient: fakeClient, Check: time.Second},
	} {
		if _, err := kubernetes.New(cfg); err != nil {
			t.Errorf("New(%+v): %v", cfg, err)
		}
	}
}

// TestServicePortsBindOnLoopbackByDefault checks that a Config without
// ListenAddr binds the service ports on 127.0.0.1.
func TestServicePortsBindOnLoopbackByDefault(t *testing.T) {
	cs := fake.NewClientset(service("np", corev1.ServiceTypeNodePort, [2]int32{80, 31201}))
	src := newSource(t, kubernetes.Config{
		NewClient: func([]byte) (kubernetes.Client, error) { return fakeCluster{cs}, nil },
		Check:     20 * time.Millisecond,
	})
	r := core.NewRouter(core.RouterConfig{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, r.Emitter(kubernetes.Name)) }()
	defer func() { cancel(); <-done }()
	testenv.Eventually(t, waitTimeout, "the service on 127.0.0.1", func() (bool, string) {
		d := r.Desired()
		return len(d) == 1 && len(d[0].Ports) == 1 && d[0].Ports[0].HostIP == netip.MustParseAddr("127.0.0.1"), desired(r)
	})
}
