package containerd_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/containerd"
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
		cfg  containerd.Config
		want string // in the error; "" for none
	}{
		{"defaults", containerd.Config{Socket: containerd.DefaultSocket}, ""},
		{"rules off, no iptables", containerd.Config{Socket: containerd.DefaultSocket,
			LoopbackNAT: loopbacknat.Options{Iptables: missing}}, ""},
		{"zero config", containerd.Config{}, ""},
		{"IPv6 guest address", containerd.Config{Socket: containerd.DefaultSocket, LoopbackNAT: with(nat, func(o *loopbacknat.Options) { o.GuestIP = "fd00::2" })},
			`--containerdNATGuestIP "fd00::2" is not an IPv4 address`},
		{"no iptables", containerd.Config{Socket: containerd.DefaultSocket, LoopbackNAT: with(nat, func(o *loopbacknat.Options) { o.Iptables = missing })},
			"turn the rules off with --containerdLoopbackNAT=false"},
		{"data root", containerd.Config{NerdctlDataRoot: "/srv/nerdctl"}, ""},
		{"relative data root", containerd.Config{NerdctlDataRoot: "var/lib/nerdctl"},
			`--containerdNerdctlDataRoot "var/lib/nerdctl" is not an absolute, clean path`},
		{"unclean data root", containerd.Config{NerdctlDataRoot: "/var/lib/nerdctl/../nerdctl"},
			`--containerdNerdctlDataRoot "/var/lib/nerdctl/../nerdctl" is not an absolute, clean path`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := containerd.New(tt.cfg)
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
		{[]string{"--containerdSock=/run/test.sock", "--containerdLoopbackNAT=false"}, ""},
		{[]string{"--containerdSock=", "--containerdLoopbackNAT=false"}, "--containerdSock"},
		{[]string{"--containerdSock=/run/test.sock", "--containerdNATGuestIP=fd00::2"}, `--containerdNATGuestIP "fd00::2" is not an IPv4 address`},
		{[]string{"--containerdSock=/run/test.sock", "--containerdNATInterface="}, "--containerdNATInterface"},
		{[]string{"--containerdSock=/run/test.sock", "--containerdIptables=" + filepath.Join(t.TempDir(), "no-iptables")}, "--containerdLoopbackNAT=false"},
		{[]string{"--containerdNerdctlDataRoot=/srv/nerdctl", "--containerdLoopbackNAT=false"}, ""},
		{[]string{"--containerdNerdctlDataRoot=", "--containerdLoopbackNAT=false"}, "--containerdNerdctlDataRoot"},
		{[]string{"--containerdNerdctlDataRoot=/srv/nerdctl/", "--containerdLoopbackNAT=false"}, `--containerdNerdctlDataRoot "/srv/nerdctl/" is not an absolute, clean path`},
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
			s, err := b.NewSource(containerd.Name, registry.Env{})
			testenv.WantError(t, err, tt.want)
			if err == nil && s == nil {
				t.Fatal("no source and no error")
			}
		})
	}
}
