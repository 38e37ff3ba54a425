package sockets_test

import (
	"net"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/sockets"
)

// TestWakeFilterInKernel attaches the programs with the filter a Source
// reading a test namespace builds, and opens and closes real TCP
// listeners and bound UDP sockets: one in the test namespace wakes the
// reader; one in the machine's own namespace, one in the test namespace
// opened by a process named as an excluded command (docker-proxy), and a
// UDP client's socket that a send binds, wake nothing.
func TestWakeFilterInKernel(t *testing.T) {
	testenv.Integration(t)
	ns := testenv.Netns(t)
	s, err := sockets.New(sockets.Config{Netns: "/var/run/netns/" + ns})
	if err != nil {
		t.Fatal(err)
	}
	wake, how, err := sockets.LoadWakeups(s)
	if err != nil {
		t.Fatalf("loading the eBPF program: %v", err)
	}
	defer wake.Close()
	if how != "this network namespace" {
		t.Fatalf("wake-ups come from %s: this kernel has BTF, they should come from the namespace read", how)
	}
	user := startHelper(t, ns, "")
	proxy := startHelper(t, ns, "docker-proxy")
	// woke reports whether a wake-up comes within a second, after
	// draining any that came before.
	drain := func() {
		for {
			select {
			case <-wake.C:
			case <-time.After(100 * time.Millisecond):
				return
			}
		}
	}
	woke := func() bool {
		select {
		case <-wake.C:
			return true
		case <-time.After(time.Second):
			return false
		}
	}
	drain()
	if !wake.UDP {
		t.Fatalf("no UDP wake-ups (%v): this kernel has cgroup socket programs", wake.UDPErr)
	}
	for _, c := range []struct {
		name string
		do   func(open bool)
		want bool
	}{
		{"a listener of the namespace", func(open bool) {
			if open {
				user.do(t, "listen tcp 127.0.0.1:7101")
			} else {
				user.do(t, "close tcp 127.0.0.1:7101")
			}
		}, true},
		{"docker-proxy's listener in the namespace", func(open bool) {
			if open {
				proxy.do(t, "listen tcp 127.0.0.1:7102")
			} else {
				proxy.do(t, "close tcp 127.0.0.1:7102")
			}
		}, false},
		{"a bound UDP socket of the namespace", func(open bool) {
			if open {
				user.do(t, "listen udp 127.0.0.1:7103")
			} else {
				user.do(t, "close udp 127.0.0.1:7103")
			}
		}, true},
		{"docker-proxy's UDP socket in the namespace", func(open bool) {
			if open {
				proxy.do(t, "listen udp 127.0.0.1:7104")
			} else {
				proxy.do(t, "close udp 127.0.0.1:7104")
			}
		}, false},
		{"a UDP client's socket in the namespace (bound by its send)", func(open bool) {
			if open {
				user.do(t, "send udp 127.0.0.1:7105")
			}
		}, false},
		{"a bound UDP socket of the machine's own namespace", func(open bool) {
			if !open {
				return
			}
			c, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		}, false},
		{"a listener of the machine's own namespace", func(open bool) {
			if !open {
				return
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			l.Close()
		}, false},
	} {
		for _, open := range []bool{true, false} {
			c.do(open)
			if got := woke(); got != c.want {
				t.Errorf("%s (open %v): woke %v, want %v", c.name, open, got, c.want)
			}
			drain()
		}
	}
}
