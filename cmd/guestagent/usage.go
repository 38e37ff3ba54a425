package main

import (
	"fmt"
	"io"
	"maps"
	"slices"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/registry"
)

const intro = `guestagent watches container engines, Kubernetes and the kernel's NAT rules
for ports that must be exposed, and delivers port mappings to the processes
that expose them on the host (selected by the networking mode).

Usage: guestagent [flags]          run the agent
       guestagent COMMAND [flags]  ask the running agent (as root, over --controlSocket)

Flags may be written --name or -name; booleans take --name=false.
`

func usage(w io.Writer, c *config, b *registry.Bound) {
	fmt.Fprint(w, intro)
	fmt.Fprintln(w, "\nCommands (guestagent COMMAND --help for their flags):")
	for _, name := range slices.Sorted(maps.Keys(commands)) {
		fmt.Fprintf(w, "  %-8s %s\n", name, commands[name])
	}
	section := func(title string, fs *pflag.FlagSet) {
		fmt.Fprintf(w, "\n%s:\n%s", title, fs.FlagUsages())
	}
	section("General", c.general)
	section("Networking mode", c.mode)
	section("Sources, enabled by Rancher Desktop-compatible flags (a source missing from this build is an error)", c.enabling)
	fmt.Fprintln(w, "\nPlugins in this build (enable sources with --sources NAME, sinks with --sinks NAME):")
	for _, g := range b.Groups {
		fmt.Fprintf(w, "\n%s %q: %s\n", g.Kind, g.Name, g.Summary)
		if u := g.Flags.FlagUsages(); u != "" {
			fmt.Fprint(w, u)
		}
	}
	fmt.Fprintln(w, `
Networking modes: --adminInstall sends to host-switch (plus wsl-proxy with
--wslIntegration); --privilegedService sends to vtunnel; with neither, every
binding goes to localhost and host ports below 1024 are refused (logged).`)
}
