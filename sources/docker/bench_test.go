package docker_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/client"

	"github.com/guestagent/guestagent/core/sourcetest"
	"github.com/guestagent/guestagent/sources/docker"
)

// BenchmarkDeliveryLatency measures, against the real dockerd, the time
// from a container's start event (stamped by the daemon) to the delivery
// of its published port to a sink, one container at a time.
func BenchmarkDeliveryLatency(b *testing.B) {
	d := requireEngine(b)
	arrivals := sourcetest.Deliver(b, docker.Name, newSource(b))
	cli, err := client.New(client.WithHost(d.Host))
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream := cli.Events(ctx, client.EventsListOptions{Filters: make(client.Filters).
		Add("type", string(events.ContainerEventType)).Add("event", string(events.ActionStart))})
	started := map[string]time.Time{}
	var ids []string
	defer func() {
		if len(ids) > 0 {
			_, _ = d.Docker(append([]string{"rm", "-f"}, ids...)...)
		}
	}()
	sourcetest.MeasureLatency(b, arrivals, func(i int) (uint16, time.Time) {
		port := 41000 + i
		id := run(b, d, "-p", fmt.Sprintf("127.0.0.1:%d:80", port))
		ids = append(ids, id)
		for started[id].IsZero() {
			select {
			case msg := <-stream.Messages:
				started[msg.Actor.ID] = time.Unix(0, msg.TimeNano)
			case err := <-stream.Err:
				b.Fatalf("event stream: %v", err)
			case <-time.After(30 * time.Second):
				b.Fatalf("no start event for %s", id)
			}
		}
		return uint16(port), started[id]
	})
}
