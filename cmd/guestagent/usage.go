package main

import (
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/registry"
)

const intro = `guestagent watches container engines, Kubernetes and the kernel's NAT rules
for ports that must be exposed, and delivers port mappings to the processes
that expose them on the host (selected by the networking mode).

Usage: guestagent [flags]          run the agent
       guestagent COMMAND [flags]  ask the running agent (as root, over --controlSocket),
                                   or print the version

Flags may be written --name or -name; booleans take --name=false.
`

// modes says which sinks --sinks=auto selects in each networking mode
// (see modeSinks).
const modes = `Networking modes (the sinks --sinks=auto selects): --adminInstall (network
tunnel) sends to host-switch, with the bindings as the engines made them;
--privilegedService sends to vtunnel, as bound; with neither, the agent sends
to host-switch with every binding moved to localhost, and host ports below
1024 are refused (logged). In both modes but the privileged service, wsl-proxy
gets the ports too while --wslIntegration is on (the default).`

// maxHelpWidth is the widest the help gets, and its width when stdout is
// not a terminal.
const maxHelpWidth = 100

// helpWidth is the width to wrap the help at on w: the terminal's when w
// is a narrower terminal, else maxHelpWidth.
func helpWidth(w io.Writer) int {
	f, ok := w.(*os.File)
	if !ok {
		return maxHelpWidth
	}
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col < 40 {
		return maxHelpWidth
	}
	return min(int(ws.Col), maxHelpWidth)
}

// wrapText breaks s into lines of at most width columns, at spaces; each
// line after the first starts with indent spaces. A word longer than the
// line stays whole.
func wrapText(s string, first, indent, width int) string {
	var b strings.Builder
	col := first
	for i, word := range strings.Fields(s) {
		switch {
		case i == 0:
		case col+1+len(word) > width:
			b.WriteString("\n" + strings.Repeat(" ", indent))
			col = indent
		default:
			b.WriteByte(' ')
			col++
		}
		b.WriteString(word)
		col += len(word)
	}
	return b.String()
}

// paragraphs wraps each paragraph (lines separated by a blank line) of s
// to width.
func paragraphs(s string, width int) string {
	ps := strings.Split(strings.TrimSpace(s), "\n\n")
	for i, p := range ps {
		ps[i] = wrapText(p, 0, 0, width)
	}
	return strings.Join(ps, "\n\n") + "\n"
}

// flagUsages renders fs's flags wrapped to width. A flag whose text says
// its default in words, "(default from X, else Y)", gets the value it has
// here inside that parenthesis, instead of a second "(default ...)".
func flagUsages(fs *pflag.FlagSet, width int) string {
	shown := pflag.NewFlagSet(fs.Name(), pflag.ContinueOnError)
	fs.VisitAll(func(f *pflag.Flag) {
		c := *f
		if strings.Contains(c.Usage, "(default ") && strings.HasSuffix(c.Usage, ")") {
			if zero := zeroDefault(f); c.DefValue != zero && c.DefValue != "" {
				v := c.DefValue
				if f.Value.Type() == "string" {
					v = strconv.Quote(v)
				}
				c.Usage = c.Usage[:len(c.Usage)-1] + "; here " + v + ")"
			}
			c.DefValue = zeroDefault(f) // pflag leaves out a zero default
		}
		shown.AddFlag(&c)
	})
	return breakLongWords(shown.FlagUsagesWrapped(width), width)
}

// breakLongWords breaks each line of s that is wider than width after its
// last comma that fits (a long list of default values is one word to
// pflag), going on with the line's indent.
func breakLongWords(s string, width int) string {
	lines := strings.Split(s, "\n")
	var out []string
	for _, l := range lines {
		indent := strings.Repeat(" ", len(l)-len(strings.TrimLeft(l, " ")))
		for len(l) > width {
			i := strings.LastIndexByte(l[:width], ',')
			if i <= len(indent) {
				break
			}
			out = append(out, l[:i+1])
			l = indent + l[i+1:]
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// zeroDefault is the default that pflag does not print for f's type.
func zeroDefault(f *pflag.Flag) string {
	switch t := f.Value.Type(); {
	case t == "duration" || t == "count" || strings.HasPrefix(t, "int") || strings.HasPrefix(t, "uint") || strings.HasPrefix(t, "float"):
		if !strings.HasSuffix(t, "Slice") {
			return "0"
		}
		return "[]"
	case strings.HasSuffix(t, "Slice") || strings.HasSuffix(t, "Array"):
		return "[]"
	case t == "bool":
		return "false"
	case t == "ip" || t == "ipMask" || t == "ipNet":
		return "<nil>"
	}
	return ""
}

func usage(w io.Writer, c *config, b *registry.Bound) {
	width := helpWidth(w)
	fmt.Fprint(w, intro)
	fmt.Fprintln(w, "\nCommands (guestagent COMMAND --help for their flags):")
	for _, name := range slices.Sorted(maps.Keys(commands)) {
		fmt.Fprintf(w, "  %-8s %s\n", name, wrapText(commands[name], 11, 11, width))
	}
	section := func(title string, fs *pflag.FlagSet) {
		fmt.Fprintf(w, "\n%s:\n%s", wrapText(title, 0, 2, width), flagUsages(fs, width))
	}
	section("General", c.general)
	section("Networking mode", c.mode)
	section("Sources, enabled by Rancher Desktop-compatible flags (each source declares its own; the flag of a source missing from this build takes only false)", b.Enabling)
	fmt.Fprintln(w, "\n"+wrapText("Plugins in this build (enable sources with --sources NAME, sinks with --sinks NAME):", 0, 2, width))
	for _, g := range b.Groups {
		fmt.Fprintf(w, "\n%s\n", wrapText(fmt.Sprintf("%s %q: %s", g.Kind, g.Name, g.Summary), 0, 2, width))
		if u := flagUsages(g.Flags, width); u != "" {
			fmt.Fprint(w, u)
		}
	}
	fmt.Fprint(w, "\n"+paragraphs(modes, width))
}

// commandUsage prints the help of a command.
func commandUsage(w io.Writer, name string, fs *pflag.FlagSet) {
	width := helpWidth(w)
	args := map[string]string{"explain": " PORT[/tcp|udp]"}[name]
	fmt.Fprintf(w, "Usage: guestagent %s [flags]%s\n\n", name, args)
	fmt.Fprint(w, paragraphs(commands[name]+".", width))
	fmt.Fprintf(w, "\n%s", flagUsages(fs, width))
}
