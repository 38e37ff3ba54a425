package kubernetes_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/kubernetes"
	"github.com/guestagent/guestagent/sources/kubernetes/apiservertest"
)

// server is the API server the tests share.
var server = testenv.NewShared("kube-apiserver", apiservertest.Start, (*apiservertest.Server).Stop)

func TestMain(m *testing.M) {
	code := m.Run()
	server.Close()
	os.Exit(code)
}

func requireServer(t testing.TB) *apiservertest.Server {
	t.Helper()
	return server.Get(t)
}

// realSource watches the cluster of the kubeconfig at path, as the
// registration builds it: from the file alone.
func realSource(t testing.TB, path string) core.Source {
	return newSource(t, kubernetes.Config{
		Path:       path,
		Check:      100 * time.Millisecond,
		ListenAddr: lo,
	})
}

// TestContractRealAPIServer runs the suite against kube-apiserver: the
// services are created, changed and deleted through the API, and the
// server is restarted for the outage.
func TestContractRealAPIServer(t *testing.T) {
	s := requireServer(t)
	ctx := context.Background()
	svcs := s.Client.CoreV1().Services("default")
	create := func(t *testing.T, svc *corev1.Service) core.Mapping {
		svc.UID = ""
		created, err := svcs.Create(ctx, svc, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return expect(created)
	}
	names := map[string]string{} // uid → name
	sourcetest.Run(t, sourcetest.Harness{
		New: func(t *testing.T) core.Source { return realSource(t, s.Kubeconfig) },
		Expose: func(t *testing.T, name string, variant int) core.Mapping {
			svc := variantService(name, variant)
			m := create(t, svc)
			names[m.ID] = svc.Name
			return m
		},
		Unexpose: func(t *testing.T, m core.Mapping) {
			if err := svcs.Delete(ctx, names[m.ID], metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		},
		Update: func(t *testing.T, m core.Mapping, variant int) core.Mapping {
			svc, err := svcs.Get(ctx, names[m.ID], metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			n := int32(seq.Add(1))
			svc.Spec.Type = corev1.ServiceTypeLoadBalancer
			svc.Spec.Ports = []corev1.ServicePort{{Name: "p0", Protocol: corev1.ProtocolTCP, Port: 9000 + n, NodePort: 30300 + n}}
			updated, err := svcs.Update(ctx, svc, metav1.UpdateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return expect(updated)
		},
		Repeat: func(t *testing.T, m core.Mapping) {
			svc, err := svcs.Get(ctx, names[m.ID], metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			svc.Labels = map[string]string{"touched": fmt.Sprint(seq.Add(1))}
			if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		},
		Outage: func(t *testing.T, during func()) {
			s.Stop()
			if err := s.Start(); err != nil {
				t.Fatal(err)
			}
			during()
		},
		Timeout: 90 * time.Second,
	})
}

// TestClusterReset empties the cluster behind an unchanged kubeconfig (a
// desktop's "reset Kubernetes") and checks that the old services go and
// the new cluster's come.
func TestClusterReset(t *testing.T) {
	s := requireServer(t)
	ctx := context.Background()
	svcs := s.Client.CoreV1().Services("default")
	old, err := svcs.Create(ctx, service("before-reset", corev1.ServiceTypeNodePort, [2]int32{80, 32001}), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r := core.NewRouter(core.RouterConfig{})
	rctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	src := newSource(t, kubernetes.Config{NewClient: kubernetes.FromKubeconfig(s.Kubeconfig), Path: s.Kubeconfig,
		Check: 100 * time.Millisecond, ListenAddr: lo, Log: testLogger(t)})
	go func() { done <- src.Run(rctx, r.Emitter(kubernetes.Name)) }()
	defer func() { cancel(); <-done }()
	has := func(uid string) bool {
		for _, m := range r.Desired() {
			if m.ID == uid {
				return true
			}
		}
		return false
	}
	testenv.Eventually(t, waitTimeout, "the service before the reset", func() (bool, string) { return has(string(old.UID)), desired(r) })
	if err := s.Reset(); err != nil {
		t.Fatal(err)
	}
	fresh, err := svcs.Create(ctx, service("after-reset", corev1.ServiceTypeNodePort, [2]int32{80, 32002}), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 90*time.Second, "the new cluster's service alone after the reset", func() (bool, string) {
		return !has(string(old.UID)) && has(string(fresh.UID)), fmt.Sprintf("%s (old %s, new %s)", desired(r), old.UID, fresh.UID)
	})
}
