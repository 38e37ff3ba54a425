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

// BenchmarkDeliveryLatency measures, against the real kube-apiserver, the
// time from the request that creates a NodePort service (so the API
// server's write is included) to the delivery of its node port to a sink,
// one service at a time. create-p50-ms is the API server's part: the
// median time until the create request is answered.
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
	var creates []time.Duration
	sourcetest.MeasureLatency(b, arrivals, func(i int) (uint16, time.Time) {
		port := int32(31500 + i)
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-%d", port)},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{
				{Port: 80, TargetPort: intstr.FromInt32(80), NodePort: port}}},
		}
		start := time.Now()
		if _, err := svcs.Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		creates = append(creates, time.Since(start))
		names = append(names, svc.Name)
		return uint16(port), start
	})
	b.ReportMetric(float64(sourcetest.Percentile(creates, 0.5))/float64(time.Millisecond), "create-p50-ms")
}
