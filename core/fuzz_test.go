package core_test

import (
	"net/netip"
	"testing"

	"github.com/guestagent/guestagent/core"
)

// FuzzLoopbackOnly is the non-admin property: whatever port goes in, the
// policy never lets through a non-loopback address or a privileged port.
func FuzzLoopbackOnly(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0}, uint16(80))
	f.Add([]byte{127, 0, 0, 1}, uint16(8080))
	f.Add(make([]byte, 16), uint16(1024))
	f.Fuzz(func(t *testing.T, ip []byte, hostPort uint16) {
		addr, _ := netip.AddrFromSlice(ip)
		p, err := core.LoopbackOnly(core.Port{Protocol: core.TCP, ContainerPort: 80, HostIP: addr, HostPort: hostPort})
		if err != nil {
			if hostPort >= core.PrivilegedPortLimit {
				t.Fatalf("refused unprivileged port %d: %v", hostPort, err)
			}
			return
		}
		if p.HostPort < core.PrivilegedPortLimit || !p.HostIP.IsLoopback() {
			t.Fatalf("let through %v", p)
		}
	})
}

// FuzzNonAdminDesired drives a Router in the non-admin mode with arbitrary
// sets, deletes and snapshots of arbitrary ports: what it would deliver to
// its sinks never binds a non-loopback address or a host port below 1024.
func FuzzNonAdminDesired(f *testing.F) {
	f.Add([]byte{0, 1, 0, 0, 0, 0, 0, 80, 6, 1, 0, 127, 0, 0, 1, 0x1f, 0x90, 17, 2, 2, 10, 0, 0, 1, 4, 0, 6})
	f.Add([]byte{3, 0, 0, 0, 0, 0, 0x04, 0x00, 6, 2, 3, 0, 0, 0, 0, 0, 22, 6})
	mode, err := core.ModeFromFlags(false, false)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, ops []byte) {
		r := core.NewRouter(core.RouterConfig{Policy: mode.Policy()})
		em := r.Emitter("fuzz")
		// Each op is 9 bytes: kind, id, an IPv4 address (0.0.0.0 as given,
		// or :: when the kind's high bit is set), host port, protocol.
		for ; len(ops) >= 9; ops = ops[9:] {
			id := string('a' + rune(ops[1]%4))
			ip := netip.AddrFrom4([4]byte(ops[2:6]))
			if ops[0]&0x80 != 0 {
				ip = netip.IPv6Unspecified()
			}
			p := core.Port{Protocol: core.Protocol([]string{"tcp", "udp", "sctp"}[ops[8]%3]), ContainerPort: 80,
				HostIP: ip, HostPort: uint16(ops[6])<<8 | uint16(ops[7])}
			m := core.Mapping{Key: core.Key{ID: id}, Ports: []core.Port{p}}
			switch ops[0] % 4 {
			case 0, 1:
				em.Set(m)
			case 2:
				em.Delete(id)
			case 3:
				em.Snapshot([]core.Mapping{m})
			}
			for _, d := range r.Desired() {
				for _, q := range d.Ports {
					if !q.HostIP.IsLoopback() || q.HostPort < core.PrivilegedPortLimit {
						t.Fatalf("non-admin mode would deliver %v", q)
					}
				}
			}
		}
	})
}
