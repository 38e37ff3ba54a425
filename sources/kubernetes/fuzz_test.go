package kubernetes_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/guestagent/guestagent/sources/kubernetes"
)

func seed(f *testing.F, pattern string) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "testdata", "kubernetes", pattern))
	for _, name := range files {
		if data, err := os.ReadFile(name); err == nil {
			f.Add(data)
		}
	}
}

// FuzzConvertService decodes arbitrary service JSON and converts it: no
// panic, and every port returned is valid and bound at the listen address.
func FuzzConvertService(f *testing.F) {
	seed(f, "service-*.json")
	f.Add([]byte(`{"metadata":{"uid":"u"},"spec":{"type":"NodePort","ports":[{"protocol":"SCTP","nodePort":-1},{"protocol":"ICMP","nodePort":70000}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var svc kubernetes.Service
		if json.Unmarshal(data, &svc) != nil {
			return
		}
		m, skipped := kubernetes.Convert(&svc, lo)
		if len(m.Ports)+len(skipped) > len(svc.Spec.Ports) {
			t.Fatalf("%d ports and %d skipped from %d", len(m.Ports), len(skipped), len(svc.Spec.Ports))
		}
		if typ := svc.Spec.Type; typ != kubernetes.TypeNodePort && typ != kubernetes.TypeLoadBalancer && len(m.Ports)+len(skipped) > 0 {
			t.Fatalf("a service of type %q gave ports %v or skips %v", typ, m.Ports, skipped)
		}
		for _, p := range m.Ports {
			if err := p.Validate(); err != nil {
				t.Fatalf("invalid port returned: %v", err)
			}
			if p.HostIP != lo {
				t.Fatalf("port bound at %v, want %v", p.HostIP, lo)
			}
		}
	})
}

// FuzzKubeconfig feeds arbitrary kubeconfig content to the client factory:
// a client or an error, never a panic.
func FuzzKubeconfig(f *testing.F) {
	seed(f, "kubeconfig*.yaml")
	f.Add([]byte("apiVersion: v1\nclusters: [{cluster: {server: '::'}, name: x}]\ncurrent-context: nope\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cs, err := kubernetes.FromKubeconfig("fuzz.yaml")(data)
		if err == nil && cs == nil {
			t.Fatal("no client and no error")
		}
	})
}
