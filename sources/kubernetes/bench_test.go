package kubernetes_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/sources/kubernetes"
)

// latencySamples is how many services one latency measurement creates.
const latencySamples = 30

// BenchmarkDeliveryLatency measures, against the real kube-apiserver, the
// time from the request that creates a NodePort service (so the API
// server's write is included) to the delivery of its node port to a sink,
// one service at a time.
func BenchmarkDeliveryLatency(b *testing.B) {
	s := requireServer(b)
	arrivals := sourcetest.Deliver(b, kubernetes.Name, realSource(s.Kubeconfig))
	svcs := s.Client.CoreV1().Services("default")
	ctx := context.Background()
	var names []string
	defer func() {
		for _, n := range names {
			_ = svcs.Delete(ctx, n, metav1.DeleteOptions{})
		}
	}()
	var lat []time.Duration
	port := int32(31500)
	for b.Loop() {
		for range latencySamples {
			port++
			svc := &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-%d", port)},
				Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{
					{Port: 80, TargetPort: intstr.FromInt32(80), NodePort: port}}},
			}
			start := time.Now()
			if _, err := svcs.Create(ctx, svc, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
			names = append(names, svc.Name)
			lat = append(lat, arrivals.Wait(b, uint16(port), 30*time.Second).Sub(start))
		}
	}
	sourcetest.ReportLatency(b, lat)
}
