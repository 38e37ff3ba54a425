package main

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/registry"
)

// config is the parsed command line.
type config struct {
	debug, showVersion    bool
	sources, sinks        []string
	adminInstall, privSvc bool
	wslIntegration        bool
	k8sListener           string
	k8sAPIPort            int
	unexposeOnExit        bool
	statusAddr            string
	statusAllowRemote     bool
	pprof                 bool
	controlSocket         string
	stateDir              string
	tapIP                 string
	changed               func(flag string) bool // whether the command line set the flag
	general, mode         *pflag.FlagSet
}

func defineFlags(fs *pflag.FlagSet) *config {
	c := &config{changed: fs.Changed}
	c.general = pflag.NewFlagSet("general", pflag.ContinueOnError)
	c.general.BoolVar(&c.debug, "debug", false, "debug logging")
	c.general.BoolVar(&c.showVersion, "version", false, "print the version and exit")
	c.general.StringSliceVar(&c.sources, "sources", nil, "more sources to enable by name, comma-separated (see the list below)")
	c.general.StringSliceVar(&c.sinks, "sinks", []string{"auto"}, `sinks to deliver to by name, comma-separated; "auto" means the ones the networking mode selects`)
	c.general.BoolVar(&c.unexposeOnExit, "unexposeOnExit", true, "on SIGINT/SIGTERM, remove every exposed port before exiting")
	c.general.StringVar(&c.stateDir, "stateDir", "/var/lib/guestagent", "directory of the ownership records: which ports this agent exposed on each sink, so that after a restart (or a crash) it removes exactly its own leftovers and never another party's; made 0700 when missing, not used (records in memory, with a warning) when others may write to it; empty keeps them in memory only")
	c.general.StringVar(&c.controlSocket, "controlSocket", DefaultControlSocket, "unix socket (0600: root only) on which the agent serves its state to 'guestagent status', 'watch' and 'explain'; a missing directory is created 0700, an existing one is left as it is, and anything at the path but a stale socket (a symbolic link included) is refused; empty: off")
	c.general.BoolVar(&c.statusAllowRemote, "statusAllowRemote", false, "let --statusAddr listen on an address other than loopback (anyone who reaches it reads the agent's state)")
	c.general.StringVar(&c.statusAddr, "statusAddr", "", fmt.Sprintf("serve GET /status (current mappings, JSON), GET /watch and GET /metrics (Prometheus) on this address, e.g. 127.0.0.1:9901; at most %d connections at a time (%d of them /watch streams), idle ones closed after %s; empty: off", maxConns, maxWatches, idleTimeout))
	c.general.BoolVar(&c.pprof, "pprof", false, fmt.Sprintf("with --statusAddr: also serve the Go runtime's profiles (heap, goroutines, CPU) under /debug/pprof/ there, for 'go tool pprof http://ADDR/debug/pprof/heap'; a timed profile (profile, trace, any with ?seconds=N) lasts at most %ds and one runs at a time", maxProfileSeconds))

	c.mode = pflag.NewFlagSet("mode", pflag.ContinueOnError)
	c.mode.BoolVar(&c.adminInstall, "adminInstall", false, "network-tunnel mode: forward to host-switch's API as bound (the agent runs in its own network namespace)")
	c.mode.BoolVar(&c.privSvc, "privilegedService", false, "privileged-service mode: forward over the vtunnel peer to the privileged host service")
	c.mode.BoolVar(&c.wslIntegration, "wslIntegration", true, "also send mappings to wsl-proxy so other WSL distributions reach them (not in privileged-service mode)")
	c.mode.StringVar(&c.k8sListener, "k8sServiceListenerAddr", "127.0.0.1", "IP to bind Kubernetes services on the host: 0.0.0.0 or 127.0.0.1")
	c.mode.IntVar(&c.k8sAPIPort, "k8sAPIPort", 6443, "Kubernetes API port announced to wsl-proxy so other distributions can use kubectl")
	c.mode.StringVar(&c.tapIP, "tap-interface-ip", "", "this guest's address on the virtual network, for every plugin that needs it: it sets each plugin's guest address flag not given (--hostSwitchGuestIP, the loopback NAT guest addresses, the sockets relay's address); the name Rancher Desktop's agent uses")
	fs.AddFlagSet(c.general)
	fs.AddFlagSet(c.mode)
	return c
}

// applyGuestIP sets each plugin's guest address flag (as the plugins
// declare them) that was not given to ip, when ip is set.
func applyGuestIP(fs *pflag.FlagSet, b *registry.Bound, ip string) error {
	if ip == "" {
		return nil
	}
	if a, err := netip.ParseAddr(ip); err != nil || !a.Is4() {
		return fmt.Errorf("--tap-interface-ip %q is not an IPv4 address", ip)
	}
	if err := b.ApplyGuestAddr(fs, ip); err != nil {
		return fmt.Errorf("--tap-interface-ip: %w", err)
	}
	return nil
}

// longFlags rewrites "-name" and "-name=value" to their "--" form when name
// is a long flag, so Rancher Desktop's single-dash style keeps working.
func longFlags(fs *pflag.FlagSet, args []string) []string {
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' {
			name, _, _ := strings.Cut(a[1:], "=")
			if fs.Lookup(name) != nil {
				a = "-" + a
			}
		}
		out = append(out, a)
	}
	return out
}
