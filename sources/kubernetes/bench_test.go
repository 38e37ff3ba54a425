package kubernetes_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/sources/kubernetes"
)

// BenchmarkDeliveryLatency measures, against the real kube-apiserver, the
// time from the API server's watch event for a new NodePort service to
// the delivery of its node port to a sink, one service at a time: the
// benchmark watches the services itself and takes the moment its own watch
// receives the ADDED event, which the API server sends to every watcher,
// the agent's informer included, once it has stored the object. So the
// figure is the agent's share: its informer, the router and the sink.
// create-p50-ms and create-p99-ms are the time from sending the create
// request to the delivery, the API server's write included.
func BenchmarkDeliveryLatency(b *testing.B) {
	s := requireServer(b)
	arrivals := sourcetest.Deliver(b, kubernetes.Name, realSource(b, s.Kubeconfig))
	svcs := s.Client.CoreV1().Services("default")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, err := svcs.Watch(ctx, metav1.ListOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Stop()
	var names []string
	defer func() {
		for _, n := range names {
			_ = svcs.Delete(context.Background(), n, metav1.DeleteOptions{})
		}
	}()
	created := map[uint16]time.Time{}
	sourcetest.MeasureLatency(b, arrivals, func(i int) (uint16, time.Time) {
		port := int32(31500 + i)
		name := fmt.Sprintf("bench-%d", port)
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{
				{Port: 80, TargetPort: intstr.FromInt32(80), NodePort: port}}},
		}
		created[uint16(port)] = time.Now()
		if _, err := svcs.Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		names = append(names, name)
		for {
			select {
			case ev, ok := <-w.ResultChan():
				if !ok {
					b.Fatal("the benchmark's watch ended")
				}
				if o, isSvc := ev.Object.(*corev1.Service); isSvc && ev.Type == watch.Added && o.Name == name {
					return uint16(port), time.Now()
				}
			case <-time.After(30 * time.Second):
				b.Fatalf("no ADDED event for %s", name)
			}
		}
	})
	var fromCreate []time.Duration
	for port, at := range created {
		fromCreate = append(fromCreate, arrivals.Wait(b, port, time.Second).Sub(at))
	}
	b.ReportMetric(float64(sourcetest.Percentile(fromCreate, 0.5))/float64(time.Millisecond), "create-p50-ms")
	b.ReportMetric(float64(sourcetest.Percentile(fromCreate, 0.99))/float64(time.Millisecond), "create-p99-ms")
}
