package gvproxytest_test

import (
	"context"
	"testing"

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
