package core_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
)

func TestPortValidate(t *testing.T) {
	ok := core.Port{Protocol: core.SCTP, ContainerPort: 1, HostPort: 65535}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid port refused: %v", err)
	}
	for _, p := range []core.Port{
		{Protocol: "icmp", ContainerPort: 1, HostPort: 1},
		{Protocol: core.TCP, ContainerPort: 0, HostPort: 1},
		{Protocol: core.TCP, ContainerPort: 1, HostPort: 0},
		{Protocol: core.TCP, ContainerPort: 1, HostPort: 1, HostIP: netip.MustParseAddr("fe80::1%eth0")},
	} {
		if err := p.Validate(); err == nil {
			t.Errorf("%+v accepted", p)
		}
	}
}

func TestParseProtocol(t *testing.T) {
	for in, want := range map[string]core.Protocol{"": core.TCP, "TCP": core.TCP, " udp ": core.UDP, "Sctp": core.SCTP} {
		if got, err := core.ParseProtocol(in); err != nil || got != want {
			t.Errorf("ParseProtocol(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := core.ParseProtocol("icmp"); err == nil {
		t.Error("icmp accepted")
	}
}

func TestNormalizeSortsAndDedupes(t *testing.T) {
	a := core.Port{Protocol: core.TCP, ContainerPort: 80, HostPort: 9000}
	b := core.Port{Protocol: core.TCP, ContainerPort: 80, HostPort: 8000}
	m := core.Mapping{Ports: []core.Port{a, b, a}}.Normalize()
	if len(m.Ports) != 2 || m.Ports[0] != b {
		t.Errorf("Normalize = %v", m.Ports)
	}
	if !m.Equal(core.Mapping{Ports: []core.Port{b, a}}.Normalize()) {
		t.Error("equal port sets in different order compare unequal")
	}
}

func TestModes(t *testing.T) {
	if _, err := core.ModeFromFlags(true, true); err == nil {
		t.Error("both modes at once accepted")
	}
	tests := []struct {
		admin, priv bool
		want        core.Mode
		policy      bool
	}{
		{false, false, core.ModeLocal, true},
		{true, false, core.ModeTunnel, false},
		{false, true, core.ModePrivileged, false},
	}
	for _, tt := range tests {
		m, err := core.ModeFromFlags(tt.admin, tt.priv)
		if err != nil {
			t.Fatal(err)
		}
		if m != tt.want {
			t.Errorf("ModeFromFlags(%v, %v) = %v, want %v", tt.admin, tt.priv, m, tt.want)
		}
		if (m.Policy() != nil) != tt.policy {
			t.Errorf("%v policy set = %v, want %v", m, m.Policy() != nil, tt.policy)
		}
	}
}

func TestBackoffBounds(t *testing.T) {
	b := core.Backoff{Initial: 100 * time.Millisecond, Max: time.Second}
	for attempt, base := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		base *= time.Millisecond
		for range 20 {
			d := b.Delay(attempt)
			if d < base*8/10 || d > base*12/10 {
				t.Fatalf("Delay(%d) = %v, want within 20%% of %v", attempt, d, base)
			}
		}
	}
	if d := b.Delay(1 << 20); d > 1200*time.Millisecond {
		t.Errorf("Delay of a huge attempt = %v, not capped", d)
	}
}
