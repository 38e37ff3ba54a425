package docker_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/docker"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

// TestNewChecksConfig pins what New rejects, each error naming the flag
// of the value at fault, and that the zero LoopbackNAT keeps no rules (so
// New needs no iptables).
func TestNewChecksConfig(t *testing.T) {
	nat := loopbacknat.Options{Enabled: true, Iptables: "iptables", Interface: "eth0", GuestIP: "192.168.127.2"}
	missing := filepath.Join(t.TempDir(), "no-iptables")
	for _, tt := range []struct {
		name string
		cfg  docker.Config
		want string // in the error; "" for none
	}{
		{"defaults", docker.Config{Host: docker.DefaultHost}, ""},
		{"rules off, no iptables", docker.Config{Host: docker.DefaultHost,
			LoopbackNAT: loopbacknat.Options{Iptables: missing}}, ""},
		{"zero config", docker.Config{}, ""},
		{"bad host", docker.Config{Host: "tcp://[::1"}, "--dockerHost"},
		{"IPv6 guest address", docker.Config{Host: docker.DefaultHost, LoopbackNAT: with(nat, func(o *loopbacknat.Options) { o.GuestIP = "fd00::2" })},
			`--dockerNATGuestIP "fd00::2" is not an IPv4 address`},
		{"no iptables", docker.Config{Host: docker.DefaultHost, LoopbackNAT: with(nat, func(o *loopbacknat.Options) { o.Iptables = missing })},
			"turn the rules off with --dockerLoopbackNAT=false"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := docker.New(tt.cfg)
			testenv.WantError(t, err, tt.want)
			if err == nil && s == nil {
				t.Fatal("no source and no error")
			}
		})
	}
}

func with(o loopbacknat.Options, edit func(*loopbacknat.Options)) loopbacknat.Options {
	edit(&o)
	return o
}

// TestFlagsReachNew binds the registered flags and builds the source from
// them: the flags' values, and the loopback NAT defaults, reach New.
func TestFlagsReachNew(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string // in the error; "" for none
	}{
		{[]string{"--dockerHost=unix:///run/test.sock", "--dockerLoopbackNAT=false"}, ""},
		{[]string{"--dockerHost=tcp://[::1", "--dockerLoopbackNAT=false"}, "--dockerHost"},
		{[]string{"--dockerHost=unix:///run/test.sock", "--dockerNATGuestIP=fd00::2"}, `--dockerNATGuestIP "fd00::2" is not an IPv4 address`},
		{[]string{"--dockerHost=unix:///run/test.sock", "--dockerNATInterface="}, "--dockerNATInterface"},
		{[]string{"--dockerHost=", "--dockerLoopbackNAT=false"}, "--dockerHost"},
		{[]string{"--dockerHost=unix:///run/test.sock", "--dockerIptables=" + filepath.Join(t.TempDir(), "no-iptables")}, "--dockerLoopbackNAT=false"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
			b, err := registry.Bind(fs)
			if err != nil {
				t.Fatal(err)
			}
			if err := fs.Parse(tt.args); err != nil {
				// An empty value is refused as the command line is parsed.
				if tt.want == "" || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("parse: %v", err)
				}
				return
			}
			s, err := b.NewSource(docker.Name, registry.Env{})
			testenv.WantError(t, err, tt.want)
			if err == nil && s == nil {
				t.Fatal("no source and no error")
			}
		})
	}
}
