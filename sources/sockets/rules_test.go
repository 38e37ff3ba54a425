package sockets_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/sockets"
)

// fixture reads a struct inet_diag_msg with its attributes, as a real
// kernel sent it, from testdata/sockets.
func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "sockets", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeRealMessages(t *testing.T) {
	tests := []struct {
		file   string
		proto  core.Protocol
		family uint8
		state  uint8
		addr   string
		port   uint16
		v6only bool
		id     string
	}{
		{"tcp4-any-18101.bin", core.TCP, unix.AF_INET, 10, "0.0.0.0", 18101, false, "tcp/0.0.0.0:18101"},
		{"tcp6-dual-18102.bin", core.TCP, unix.AF_INET6, 10, "::", 18102, false, "tcp/0.0.0.0:18102"},
		{"tcp6-v6only-18103.bin", core.TCP, unix.AF_INET6, 10, "::", 18103, true, "tcp/[::]:18103"},
		{"udp4-loopback-18104.bin", core.UDP, unix.AF_INET, 7, "127.0.0.1", 18104, false, "udp/127.0.0.1:18104"},
		{"udp6-dual-18105.bin", core.UDP, unix.AF_INET6, 7, "::", 18105, false, "udp/0.0.0.0:18105"},
		{"udp6-loopback-18106.bin", core.UDP, unix.AF_INET6, 7, "::1", 18106, true, "udp/[::1]:18106"},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			s, err := sockets.Decode(tt.proto, fixture(t, tt.file))
			if err != nil {
				t.Fatal(err)
			}
			if s.Family != tt.family || s.State != tt.state || s.Addr != netip.MustParseAddr(tt.addr) || s.Port != tt.port || s.V6Only != tt.v6only {
				t.Errorf("decoded %+v, want family %d state %d %s port %d v6only %v", s, tt.family, tt.state, tt.addr, tt.port, tt.v6only)
			}
			if s.Inode == 0 {
				t.Errorf("decoded no inode: %+v", s)
			}
			p, ok := sockets.Identity(s)
			if !ok || sockets.ID(p) != tt.id || p.ContainerPort != p.HostPort {
				t.Errorf("Identity = %v, %v (id %q), want id %q", p, ok, sockets.ID(p), tt.id)
			}
		})
	}
}

func TestDecodeRefusesMalformedMessages(t *testing.T) {
	good := fixture(t, "tcp6-dual-18102.bin")
	badFamily := slices.Clone(good)
	badFamily[0] = 1
	badAttr := slices.Clone(good)
	badAttr[72] = 200 // an attribute longer than the message
	tests := map[string][]byte{
		"empty":              nil,
		"short header":       good[:71],
		"unknown family":     badFamily,
		"overlong attribute": badAttr,
	}
	for name, b := range tests {
		t.Run(name, func(t *testing.T) {
			if s, err := sockets.Decode(core.TCP, b); err == nil {
				t.Errorf("Decode accepted it: %+v", s)
			}
		})
	}
	if _, err := sockets.Decode(core.TCP, good[:72]); err != nil {
		t.Errorf("a message without attributes: %v", err)
	}
	// An INET_DIAG_SKV6ONLY attribute without a value: not v6-only.
	empty := append(slices.Clone(good[:72]), 4, 0, 11, 0)
	if s, err := sockets.Decode(core.TCP, empty); err != nil || s.V6Only {
		t.Errorf("an empty v6only attribute: %+v, %v", s, err)
	}
}

func TestIdentityAddressRules(t *testing.T) {
	v4, v6 := uint8(unix.AF_INET), uint8(unix.AF_INET6)
	tests := []struct {
		name   string
		sock   sockets.Socket
		wantID string // empty: not reported
	}{
		{"IPv4 wildcard", sockets.Socket{Protocol: core.TCP, Family: v4, State: 10, Addr: addr("0.0.0.0"), Port: 80}, "tcp/0.0.0.0:80"},
		{"dual-stack wildcard is all addresses", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("::"), Port: 80}, "tcp/0.0.0.0:80"},
		{"v6only wildcard stays ::", sockets.Socket{Protocol: core.UDP, Family: v6, State: 7, Addr: addr("::"), Port: 53, V6Only: true}, "udp/[::]:53"},
		{"IPv4 loopback", sockets.Socket{Protocol: core.TCP, Family: v4, State: 10, Addr: addr("127.0.0.1"), Port: 8080}, "tcp/127.0.0.1:8080"},
		{"IPv6 loopback", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("::1"), Port: 8080, V6Only: true}, "tcp/[::1]:8080"},
		{"IPv4-mapped loopback is IPv4", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("::ffff:127.0.0.1"), Port: 8080}, "tcp/127.0.0.1:8080"},
		{"IPv4-mapped wildcard is IPv4", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("::ffff:0.0.0.0"), Port: 8080}, "tcp/0.0.0.0:8080"},
		{"specific IPv4", sockets.Socket{Protocol: core.UDP, Family: v4, State: 7, Addr: addr("198.18.7.1"), Port: 9000}, "udp/198.18.7.1:9000"},
		{"specific IPv6", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("fd00:7::1"), Port: 9000, V6Only: true}, "tcp/[fd00:7::1]:9000"},
		{"other loopback address as itself", sockets.Socket{Protocol: core.UDP, Family: v4, State: 7, Addr: addr("127.0.0.53"), Port: 5300}, "udp/127.0.0.53:5300"},
		{"link-local", sockets.Socket{Protocol: core.TCP, Family: v6, State: 10, Addr: addr("fe80::1"), Port: 9000}, ""},
		{"multicast", sockets.Socket{Protocol: core.UDP, Family: v4, State: 7, Addr: addr("224.0.0.251"), Port: 5354}, ""},
		{"TCP not listening", sockets.Socket{Protocol: core.TCP, Family: v4, State: 1, Addr: addr("0.0.0.0"), Port: 80}, ""},
		{"UDP connected", sockets.Socket{Protocol: core.UDP, Family: v4, State: 1, Addr: addr("0.0.0.0"), Port: 5000}, ""},
		{"UDP not bound", sockets.Socket{Protocol: core.UDP, Family: v4, State: 7, Addr: addr("0.0.0.0"), Port: 0}, ""},
		{"other protocol", sockets.Socket{Protocol: core.SCTP, Family: v4, State: 10, Addr: addr("0.0.0.0"), Port: 80}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, ok := sockets.Identity(tt.sock)
			got := ""
			if ok {
				got = sockets.ID(p)
				if err := p.Validate(); err != nil {
					t.Errorf("reported port does not validate: %v", err)
				}
			}
			if got != tt.wantID {
				t.Errorf("id %q, want %q", got, tt.wantID)
			}
		})
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestParsePortRanges(t *testing.T) {
	tests := []struct {
		in      []string
		want    []sockets.PortRange
		wantErr string
	}{
		{[]string{"22"}, []sockets.PortRange{{22, 22}}, ""},
		{[]string{"22,6443", "10250-10259"}, []sockets.PortRange{{22, 22}, {6443, 6443}, {10250, 10259}}, ""},
		{[]string{" 2379 - 2380 ", ""}, []sockets.PortRange{{2379, 2380}}, ""},
		{[]string{}, nil, ""},
		{[]string{"0"}, nil, "not a port number"},
		{[]string{"65536"}, nil, "not a port number"},
		{[]string{"ssh"}, nil, "not a port number"},
		{[]string{"10-5"}, nil, "ends before it starts"},
		{[]string{"1-2-3"}, nil, "not a port number"},
	}
	for _, tt := range tests {
		got, err := sockets.ParsePortRanges(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParsePortRanges(%q) error %v, want it to mention %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("ParsePortRanges(%q) = %v, %v, want %v", tt.in, got, err, tt.want)
		}
	}
	if _, err := sockets.ParsePortRanges(sockets.DefaultExclude); err != nil {
		t.Errorf("DefaultExclude does not parse: %v", err)
	}
}

func TestNewChecksConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     sockets.Config
		wantErr string
	}{
		{"defaults", sockets.Config{}, ""},
		{"negative interval", sockets.Config{Interval: -1}, "--socketsInterval"},
		{"negative settle", sockets.Config{Settle: -1}, "--socketsSettle"},
		{"bad exclusion", sockets.Config{Exclude: []string{"22,x"}}, "--socketsExclude"},
		{"missing namespace", sockets.Config{Netns: "/nonexistent/netns"}, "--socketsNetns"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := sockets.New(tt.cfg)
			if tt.wantErr == "" && err != nil {
				t.Fatalf("New: %v", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("New error %v, want it to mention %q", err, tt.wantErr)
			}
		})
	}
}
