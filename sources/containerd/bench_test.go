package containerd_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	"github.com/containerd/typeurl/v2"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/sources/containerd"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// BenchmarkDeliveryLatency measures, against the real containerd, the time
// from a task's /tasks/start event (stamped by containerd) to the delivery
// of the port its nerdctl/ports label publishes, one container at a time.
func BenchmarkDeliveryLatency(b *testing.B) {
	c := requireEngine(b)
	arrivals := sourcetest.Deliver(b, containerd.Name, newSource(b, loopbacknat.Options{}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	envelopes, errs := c.Client.Subscribe(ctx, `topic=="/tasks/start"`)
	started := map[string]time.Time{}
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = c.RemoveContainer("bench", id)
		}
	}()
	sourcetest.MeasureLatency(b, arrivals, func(i int) (uint16, time.Time) {
		port := 42000 + i
		id := fmt.Sprintf("bench-%d-%d", os.Getpid(), seq.Add(1))
		labels := portsLabel(containerd.PortEntry{HostPort: port, ContainerPort: 80, Protocol: "tcp", HostIP: "0.0.0.0"})
		if err := c.RunContainer("bench", id, labels, ""); err != nil {
			b.Fatal(err)
		}
		ids = append(ids, id)
		for started[id].IsZero() {
			select {
			case env := <-envelopes:
				ev, err := typeurl.UnmarshalAny(env.Event)
				if start, ok := ev.(*apievents.TaskStart); err == nil && ok {
					started[start.ContainerID] = env.Timestamp
				}
			case err := <-errs:
				b.Fatalf("event stream: %v", err)
			case <-time.After(30 * time.Second):
				b.Fatalf("no start event for %s", id)
			}
		}
		return uint16(port), started[id]
	})
}
