package hostswitch_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/core/sinktest"
	"github.com/guestagent/guestagent/core/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

func newSink(t *testing.T, url string, check time.Duration) *hostswitch.Sink {
	t.Helper()
	s, err := hostswitch.New(hostswitch.Config{BaseURL: url, GuestIP: hostswitch.DefaultGuestIP, CheckInterval: check})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// state lists the forwards the agent made, as "proto local".
func state(t *testing.T, g *gvproxytest.Gvproxy) []string {
	s := newSink(t, g.URL(), 0)
	all, err := s.List(context.Background())
	if err != nil {
		t.Fatalf("listing gvproxy's forwards: %v", err)
	}
	var out []string
	for _, f := range all {
		if strings.HasPrefix(f.Remote, hostswitch.DefaultGuestIP+":") && !strings.HasSuffix(f.Remote, ":22") {
			out = append(out, f.Protocol+" "+f.Local)
		}
	}
	return out
}

func TestContractAgainstGvproxy(t *testing.T) {
	g := gvproxytest.Start(t)
	sinktest.Run(t, sinktest.Harness{
		New:   func(t *testing.T) core.Sink { return newSink(t, g.URL(), 100*time.Millisecond) },
		State: func(t *testing.T) []string { return state(t, g) },
		Restart: func(t *testing.T) {
			g.Stop()
			g.Start()
		},
		Outage: func(t *testing.T, during func()) {
			g.Stop()
			during()
			time.Sleep(300 * time.Millisecond) // let deliveries fail
			g.Start()
		},
	})
}

// TestExposedPortForwards checks that gvproxy really listens on the local
// address the sink asked for, and stops when it is removed.
func TestExposedPortListens(t *testing.T) {
	g := gvproxytest.Start(t)
	s := newSink(t, g.URL(), 0)
	port := uint16(testenv.FreePort(t))
	m := sinktest.Mapping("docker", "c1", port, 1)
	if err := s.Send(context.Background(), core.Change{Mapping: m}); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("exposed port %s does not accept connections: %v", addr, err)
	}
	c.Close()
	if err := s.Send(context.Background(), core.Change{Remove: true, Mapping: m}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections after unexpose", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSyncRemovesLeftoversOnly starts from forwards a previous agent left
// behind and checks that Sync removes those but keeps gvproxy's own SSH
// forward and the desired ports.
func TestSyncRemovesLeftoversOnly(t *testing.T) {
	g := gvproxytest.Start(t)
	s := newSink(t, g.URL(), 0)
	ctx := context.Background()
	leftover := sinktest.Mapping("docker", "old", 41501, 2)
	keep := sinktest.Mapping("docker", "keep", 41511, 1)
	for _, m := range []core.Mapping{leftover, keep} {
		if err := s.Send(ctx, core.Change{Mapping: m}); err != nil {
			t.Fatal(err)
		}
	}
	fresh := newSink(t, g.URL(), 0) // as after an agent restart
	want := sinktest.Mapping("docker", "new", 41521, 1)
	if err := fresh.Sync(ctx, []core.Mapping{keep, want}); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(state(t, g), ",")
	if got != "tcp 127.0.0.1:41511,tcp 127.0.0.1:41521" {
		t.Errorf("after Sync: %s", got)
	}
	all, err := fresh.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ssh bool
	for _, f := range all {
		ssh = ssh || f.Remote == hostswitch.DefaultGuestIP+":22"
	}
	if !ssh {
		t.Error("Sync removed gvproxy's own SSH forward")
	}
}
