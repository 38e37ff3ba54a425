package sockets_test

import (
	"testing"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/sockets"
)

// FuzzDecode feeds arbitrary sock_diag payloads to the decoder: no panic,
// and whatever decodes and is reported is a valid port with a stable id.
func FuzzDecode(f *testing.F) {
	for _, name := range []string{"tcp4-any-18101.bin", "tcp6-dual-18102.bin", "tcp6-v6only-18103.bin",
		"udp4-loopback-18104.bin", "udp6-dual-18105.bin", "udp6-loopback-18106.bin"} {
		f.Add(fixture(f, name), true)
		f.Add(fixture(f, name), false)
	}
	f.Fuzz(func(t *testing.T, b []byte, tcp bool) {
		proto := core.UDP
		if tcp {
			proto = core.TCP
		}
		s, err := sockets.Decode(proto, b)
		if err != nil {
			return
		}
		p, ok := sockets.Identity(s)
		if !ok {
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("%+v reported as an invalid port: %v", s, err)
		}
		if sockets.ID(p) == "" || p.ContainerPort != p.HostPort {
			t.Fatalf("%+v reported as %v", s, p)
		}
	})
}

// FuzzParsePortRanges feeds arbitrary --socketsExclude values to the
// parser: no panic, and every range it accepts is well formed.
func FuzzParsePortRanges(f *testing.F) {
	for _, s := range append([]string{"", "1-2-3", "10-5", "65536"}, sockets.DefaultExclude...) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := sockets.ParsePortRanges([]string{s})
		if err != nil {
			return
		}
		for _, r := range rs {
			if r.First == 0 || r.Last < r.First {
				t.Fatalf("%q gave range %v", s, r)
			}
		}
	})
}
