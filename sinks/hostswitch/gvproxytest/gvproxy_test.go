package gvproxytest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

func TestStaticForwardsAreListedAndComeBack(t *testing.T) {
	g := gvproxytest.Start(t, map[string]string{"127.0.0.1:46443": "192.168.127.2:6443"})
	s, err := hostswitch.New(hostswitch.Config{BaseURL: g.URL(), GuestIP: hostswitch.DefaultGuestIP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for round := range 2 {
		all, err := s.Forwards(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, f := range all {
			got[f.Local] = f.Remote
		}
		for local, remote := range g.Static() {
			if got[local] != remote {
				t.Errorf("round %d: forward %s -> %q, want %q (all: %v)", round, local, got[local], remote, all)
			}
		}
		g.Stop()
		g.Start()
	}
}

// TestSocketServesTheAPI checks that Socket is gvproxy's -listen socket:
// it serves the forwarder API, listing gvproxy's own forwards, before and
// after a restart.
func TestSocketServesTheAPI(t *testing.T) {
	g := gvproxytest.Start(t)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true, // each round dials the gvproxy of that round
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", g.Socket())
		},
	}}
	for round := range 2 {
		res, err := client.Get("http://gvproxy/services/forwarder/all")
		if err != nil {
			t.Fatalf("round %d: GET /services/forwarder/all on %s: %v", round, g.Socket(), err)
		}
		var all []hostswitch.Forward
		err = json.NewDecoder(res.Body).Decode(&all)
		res.Body.Close()
		if err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("round %d: HTTP %d, %v", round, res.StatusCode, err)
		}
		got := map[string]string{}
		for _, f := range all {
			got[f.Local] = f.Remote
		}
		if !maps.Equal(got, g.Static()) {
			t.Errorf("round %d: the socket lists %v, want gvproxy's own forwards %v", round, got, g.Static())
		}
		g.Stop()
		g.Start()
	}
}

// TestGuestReachesAndIsReachedThroughGvproxy checks the guest path: a
// forward to the guest's address reaches a listener in the guest through
// gvforwarder, before and after gvproxy restarts and the guest rejoins.
func TestGuestReachesAndIsReachedThroughGvproxy(t *testing.T) {
	g := gvproxytest.Start(t)
	gu := gvproxytest.StartGuest(t, g)
	port := testenv.FreePort(t)
	remote := fmt.Sprintf("%s:%d", gvproxytest.GuestIP, port)
	ln, err := gu.Listen("tcp4", remote)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "from the guest\n")
			c.Close()
		}
	}()
	defer func() { ln.Close(); <-served }()
	for round := range 2 {
		if round > 0 {
			g.Stop()
			g.Start()
			t.Logf("eth0 set up again %d times after gvproxy restarted", gu.Rejoin())
		}
		local := fmt.Sprintf("127.0.0.1:%d", port)
		if err := g.Expose("tcp", local, remote); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		c, err := net.DialTimeout("tcp4", local, 5*time.Second)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if string(got) != "from the guest\n" {
			t.Fatalf("round %d: %s -> %s answered %q (%v), want the guest's listener", round, local, remote, got, err)
		}
	}
}
