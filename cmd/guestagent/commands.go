package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// The commands: version, and those that talk to a running agent over its
// control socket.
var commands = map[string]string{
	"version": "print the version, as --version does; -o json adds the Go version and the commit",
	"status":  "show every exposed port, its claims and each sink's state, then refused and conflicting ports",
	"watch":   "stream changes (added, removed, failed, recovered, refused) as they happen, starting with the current state",
	"explain": "say in plain sentences why a host port is or is not exposed: explain PORT[/tcp|udp]",
}

func isCommand(name string) bool {
	_, ok := commands[name]
	return ok
}

// Output formats of -o; the first is the default.
var outputs = []string{"table", "wide", "json"}

// versionOutputs are the output formats of version.
var versionOutputs = []string{"table", "json"}

// commandFlags are a command's flags, parsed.
type commandFlags struct {
	socket string
	output string // one of outputs
	quiet  bool   // status: the exposed ports alone
}

// parseCommandFlags parses a command's arguments; on --help it prints the
// help on stdout. It returns the exit code to end with, or -1 to go on.
func parseCommandFlags(name string, args []string, stdout, stderr io.Writer) (*commandFlags, *pflag.FlagSet, int) {
	fs := pflag.NewFlagSet("guestagent "+name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var cf commandFlags
	valid := outputs
	if name == "version" {
		valid = versionOutputs
	} else {
		fs.StringVar(&cf.socket, "socket", DefaultControlSocket, "the agent's control socket (--controlSocket of the agent)")
	}
	outputHelp := map[string]string{
		"version": "output format: table (the line --version prints) or json",
		"status":  "output format: table, wide (with full ids, the peers' errors and the container port) or json",
		"watch":   "output format: table, wide (with full ids) or json (one event per line, NDJSON)",
		"explain": "output format: table (sentences; wide is the same) or json",
	}[name]
	fs.StringVarP(&cf.output, "output", "o", valid[0], outputHelp)
	asJSON := fs.Bool("json", false, "the same as -o json")
	_ = fs.MarkHidden("json") // kept for scripts written before -o json
	if name == "status" {
		fs.BoolVarP(&cf.quiet, "quiet", "q", false, `print only the exposed ports (held by at least one sink), one per line as "tcp 127.0.0.1:8080"; nothing when none is`)
	}
	if err := fs.Parse(longFlags(fs, args)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			commandUsage(stdout, name, fs)
			return nil, nil, 0
		}
		fmt.Fprintf(stderr, "guestagent %s: %v\n", name, err)
		return nil, nil, 2
	}
	if !slices.Contains(valid, cf.output) {
		fmt.Fprintf(stderr, "guestagent %s: -o %q: want one of %s\n", name, cf.output, strings.Join(valid, ", "))
		return nil, nil, 2
	}
	if *asJSON {
		if fs.Changed("output") && cf.output != "json" {
			fmt.Fprintf(stderr, "guestagent %s: --json is -o json; it cannot go with -o %s\n", name, cf.output)
			return nil, nil, 2
		}
		cf.output = "json"
	}
	if cf.quiet && cf.output != outputs[0] {
		fmt.Fprintf(stderr, "guestagent %s: -q prints the ports alone; it cannot go with -o %s\n", name, cf.output)
		return nil, nil, 2
	}
	return &cf, fs, -1
}

// runCommand runs one of the commands; it returns the exit code.
func runCommand(ctx context.Context, name string, args []string, stdout, stderr io.Writer) int {
	cf, fs, code := parseCommandFlags(name, args, stdout, stderr)
	if code >= 0 {
		return code
	}
	c := newControlClient(cf.socket)
	wide, asJSON := cf.output == "wide", cf.output == "json"
	switch name {
	case "version":
		if fs.NArg() > 0 {
			fmt.Fprintf(stderr, "guestagent version: unexpected arguments %q\n", fs.Args())
			return 2
		}
		if asJSON {
			printJSON(stdout, buildVersion())
			return 0
		}
		fmt.Fprintln(stdout, "guestagent", versionString())
		return 0
	case "status":
		if fs.NArg() > 0 {
			fmt.Fprintf(stderr, "guestagent status: unexpected arguments %q\n", fs.Args())
			return 2
		}
		st, err := c.status(ctx)
		if err != nil {
			fmt.Fprintln(stderr, "guestagent status:", err)
			return 1
		}
		switch {
		case cf.quiet:
			for _, p := range exposedPorts(st) {
				fmt.Fprintln(stdout, p)
			}
		case asJSON:
			printJSON(stdout, statusForJSON(st))
		default:
			renderStatus(stdout, st, wide, time.Now())
		}
		return 0
	case "explain":
		if fs.NArg() != 1 {
			fmt.Fprintln(stderr, "guestagent explain: want one PORT[/tcp|udp]")
			return 2
		}
		proto, port, err := parsePortArg(fs.Arg(0))
		if err != nil {
			fmt.Fprintln(stderr, "guestagent explain:", err)
			return 2
		}
		st, err := c.status(ctx)
		if err != nil {
			fmt.Fprintln(stderr, "guestagent explain:", err)
			return 1
		}
		if asJSON {
			printJSON(stdout, explain(st, proto, port))
			return 0
		}
		for _, line := range explain(st, proto, port).sentences(time.Now()) {
			fmt.Fprintln(stdout, line)
		}
		return 0
	default: // watch
		if fs.NArg() > 0 {
			fmt.Fprintf(stderr, "guestagent watch: unexpected arguments %q\n", fs.Args())
			return 2
		}
		return c.watch(ctx, stdout, stderr, asJSON, wide)
	}
}

// versionInfo is what version -o json prints.
type versionInfo struct {
	Version string `json:"version"`
	Go      string `json:"go"`
	// Commit is the VCS revision the binary was built from, when the
	// build recorded it ("-dirty" added for a modified work tree).
	Commit string `json:"commit,omitempty"`
}

func buildVersion() versionInfo {
	v := versionInfo{Version: versionString(), Go: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		modified := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				v.Commit = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if modified && v.Commit != "" {
			v.Commit += "-dirty"
		}
	}
	return v
}

// printJSON prints v indented, as kubectl -o json does.
func printJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// exposedPorts are the ports of st that at least one sink holds, as
// "tcp 127.0.0.1:8080", in the status's order.
func exposedPorts(st core.Status) []string {
	var out []string
	for _, ps := range st.Ports {
		if slices.ContainsFunc(ps.Sinks, func(at core.PortAtSink) bool { return at.State == core.PortExposed }) {
			out = append(out, portOf(ps).String())
		}
	}
	return out
}

// statusJSON is the status as status -o json prints it: every list is
// there, [] when empty, never null or left out.
type statusJSON struct {
	core.Status
	Sources []core.SourceStatus `json:"sources"`
	Notes   []core.Note         `json:"notes"`
}

// statusForJSON fills st's empty lists, at every depth, for statusJSON.
// It changes copies of the lists it fills inside, never st's own, so that
// a status shared among readers may be given.
func statusForJSON(st core.Status) statusJSON {
	st.Ports = slices.Clone(orEmpty(st.Ports))
	for i := range st.Ports {
		st.Ports[i].Claims = orEmpty(st.Ports[i].Claims)
		st.Ports[i].Sinks = orEmpty(st.Ports[i].Sinks)
	}
	st.Mappings = slices.Clone(orEmpty(st.Mappings))
	for i := range st.Mappings {
		st.Mappings[i].Ports = orEmpty(st.Mappings[i].Ports)
	}
	st.Refused = orEmpty(st.Refused)
	st.Sinks = orEmpty(st.Sinks)
	st.Notes = slices.Clone(orEmpty(st.Notes))
	for i := range st.Notes {
		st.Notes[i].Ports = orEmpty(st.Notes[i].Ports)
	}
	return statusJSON{Status: st, Sources: orEmpty(st.Sources), Notes: st.Notes}
}

// orEmpty is s, or an empty slice (JSON []) for nil.
func orEmpty[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// parsePortArg reads "8080", "8080/tcp" or "53/udp".
func parsePortArg(s string) (core.Protocol, uint16, error) {
	num, proto, found := strings.Cut(s, "/")
	p, err := strconv.ParseUint(num, 10, 16)
	if err != nil || p == 0 {
		return "", 0, fmt.Errorf("%q: want PORT[/tcp|udp] with a port of 1-65535", s)
	}
	pr := core.TCP
	if found {
		if pr, err = core.ParseProtocol(proto); err != nil {
			return "", 0, fmt.Errorf("%q: %w", s, err)
		}
	}
	return pr, uint16(p), nil
}

// controlClient talks HTTP to the agent over its control socket.
type controlClient struct {
	socket string
	http   *http.Client
}

func newControlClient(socket string) *controlClient {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &controlClient{socket: socket, http: &http.Client{Transport: tr}}
}

// get requests path; a socket nobody answers on says that no agent runs.
func (c *controlClient) get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return nil, err
	}
	res, err := c.http.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, fmt.Errorf("no agent answers on %s (is it running, and are you root?): %w", c.socket, op.Err)
		}
		return nil, err
	}
	if res.StatusCode != http.StatusOK {
		res.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", path, res.Status)
	}
	return res, nil
}

func (c *controlClient) status(ctx context.Context) (core.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := c.get(ctx, "/status")
	if err != nil {
		return core.Status{}, err
	}
	defer res.Body.Close()
	var st core.Status
	if err := json.NewDecoder(res.Body).Decode(&st); err != nil {
		return core.Status{}, fmt.Errorf("reading the agent's status: %w", err)
	}
	return st, nil
}

// watch prints the agent's stream until ctx is done, reconnecting (and
// saying so) when the agent goes away.
func (c *controlClient) watch(ctx context.Context, stdout, stderr io.Writer, asJSON, wide bool) int {
	emit := func(ev watchEvent) {
		if asJSON {
			_ = json.NewEncoder(stdout).Encode(ev)
			return
		}
		fmt.Fprintln(stdout, eventLine(ev, wide))
	}
	connected := false
	for attempt := 0; ctx.Err() == nil; attempt++ {
		res, err := c.get(ctx, "/watch")
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			if attempt == 0 {
				fmt.Fprintln(stderr, "guestagent watch:", err)
				return 1
			}
			if !core.Sleep(ctx, time.Second) {
				break
			}
			continue
		}
		if connected {
			emit(watchEvent{Time: time.Now(), Event: evReconnected})
		}
		connected = true
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			var ev watchEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				emit(ev)
			}
		}
		res.Body.Close()
		if ctx.Err() != nil {
			break
		}
		emit(watchEvent{Time: time.Now(), Event: evDisconnected, Error: "the agent went away; reconnecting"})
		if !core.Sleep(ctx, time.Second) {
			break
		}
	}
	return 0
}

// eventLine renders one watch event as text.
func eventLine(ev watchEvent, wide bool) string {
	parts := []string{ev.Time.Format("15:04:05.000"), fmt.Sprintf("%-12s", ev.Event)}
	if p := ev.port(); p != "" {
		parts = append(parts, p)
	}
	if ev.Sink != "" {
		parts = append(parts, "at "+ev.Sink)
	}
	if ev.Event == evCurrent && ev.State != "" {
		parts = append(parts, ev.State)
	}
	if len(ev.Claims) > 0 {
		claims := make([]string, len(ev.Claims))
		for i, c := range ev.Claims {
			claims[i] = c.Key.String()
		}
		if !wide {
			claims = shortClaims(claims)
		}
		parts = append(parts, "("+strings.Join(claims, ", ")+")")
	}
	if ev.Error != "" {
		parts = append(parts, "— "+ev.Error)
	}
	return strings.Join(parts, " ")
}

// shortID shortens a container id or service UID to 12 characters, as
// docker ps does.
func shortID(id string) string {
	if len(id) > 12 && !strings.ContainsAny(id, "/:.") {
		return id[:12]
	}
	return id
}

func shortClaims(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		src, id, _ := strings.Cut(n, "/")
		out[i] = src + "/" + shortID(id)
	}
	return out
}

// renderStatus prints st as docker ps prints containers: one line per
// claimed host address, a column per sink; then refused and conflicting
// ports, the sources and how they watch, and unreachable peers.
func renderStatus(w io.Writer, st core.Status, wide bool, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	header := []string{"PROTO", "HOST ADDRESS", "BACKEND", "CLAIMED BY"}
	if wide {
		header = slices.Insert(header, 3, "CONTAINER PORT")
	}
	for _, s := range st.Sinks {
		header = append(header, strings.ToUpper(s.Name))
	}
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, ps := range st.Ports {
		var claims []string
		backend := "-"
		for i, c := range ps.Claims {
			name := c.Key.Source + "/" + c.Key.ID
			if !wide {
				name = c.Key.Source + "/" + shortID(c.Key.ID)
			}
			if c.Conflict != "" {
				name += " (conflict)"
			}
			claims = append(claims, name)
			if i == 0 {
				backend = backendOf(c)
			}
		}
		row := []string{string(ps.Protocol), addrPort(ps.HostIP, ps.HostPort), backend, strings.Join(claims, ", ")}
		if wide {
			row = slices.Insert(row, 3, containerPorts(ps.Claims))
		}
		for _, s := range st.Sinks {
			row = append(row, sinkCell(ps, s.Name, wide, now))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	_ = tw.Flush()
	if len(st.Refused) > 0 {
		fmt.Fprintln(w, "\nREFUSED")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, f := range st.Refused {
			id := f.Key.Source + "/" + shortID(f.Key.ID)
			if wide {
				id = f.Key.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Port.Protocol, addrPort(f.Port.HostIP, f.Port.HostPort), id, f.Reason)
		}
		_ = tw.Flush()
	}
	var conflicts []string
	for _, ps := range st.Ports {
		for _, c := range ps.Claims {
			if c.Conflict != "" {
				conflicts = append(conflicts, fmt.Sprintf("%s\t%s\t%s\t%s", ps.Protocol, addrPort(ps.HostIP, ps.HostPort), c.Key.Source+"/"+shortID(c.Key.ID), c.Conflict))
			}
		}
		for _, at := range ps.Sinks {
			if at.State == core.PortConflict {
				conflicts = append(conflicts, fmt.Sprintf("%s\t%s\t%s\tanother party holds it: %s", ps.Protocol, addrPort(ps.HostIP, ps.HostPort), at.Sink, at.Error))
			}
		}
	}
	if len(conflicts) > 0 {
		fmt.Fprintln(w, "\nCONFLICTS")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, l := range conflicts {
			fmt.Fprintln(tw, l)
		}
		_ = tw.Flush()
	}
	if len(st.Sources) > 0 {
		fmt.Fprintln(w, "\nSOURCES")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, s := range st.Sources {
			state := "synced"
			if !s.Synced {
				state = "waiting for its first report"
			}
			line := s.Name + "\t" + state
			if s.Watching != "" {
				line += "\t" + s.Watching
			}
			fmt.Fprintln(tw, line)
		}
		_ = tw.Flush()
	}
	for _, s := range st.Sinks {
		if s.PeerDown {
			fmt.Fprintf(w, "\n%s: peer unreachable: %s\n", s.Name, s.LastError)
		}
	}
}

func backendOf(c core.ClaimStatus) string {
	if len(c.ConnectAddrs) > 0 {
		addrs := make([]string, len(c.ConnectAddrs))
		for i, a := range c.ConnectAddrs {
			addrs[i] = a.Addr
		}
		return strings.Join(addrs, ",")
	}
	return ":" + strconv.Itoa(int(c.ContainerPort))
}

// containerPorts lists the claims' container ports, each once.
func containerPorts(claims []core.ClaimStatus) string {
	var ports []string
	for _, c := range claims {
		if p := strconv.Itoa(int(c.ContainerPort)); !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	if len(ports) == 0 {
		return "-"
	}
	return strings.Join(ports, ",")
}

// sinkCell is one sink's column of a port's line.
func sinkCell(ps core.PortStatus, sink string, wide bool, now time.Time) string {
	i := slices.IndexFunc(ps.Sinks, func(at core.PortAtSink) bool { return at.Sink == sink })
	if i < 0 {
		return "-"
	}
	at := ps.Sinks[i]
	cell := at.State
	if at.Held != "" {
		cell += " as " + at.Held
	}
	if !at.NextRetry.IsZero() {
		cell += " (retry in " + until(now, at.NextRetry) + ")"
	}
	if wide && at.Error != "" {
		cell += ": " + at.Error
	}
	return cell
}

func until(now, t time.Time) string {
	d := max(t.Sub(now), 0)
	return d.Round(100 * time.Millisecond).String()
}

// explanation is what the agent knows of one host port.
type explanation struct {
	Protocol core.Protocol     `json:"protocol"`
	Port     uint16            `json:"port"`
	Ports    []core.PortStatus `json:"ports"`   // the port's claimed addresses
	Refused  []core.Refusal    `json:"refused"` // the port's refused claims
	Nearest  []string          `json:"nearest"` // when nothing claims it
	Sinks    []core.SinkStatus `json:"sinks"`
}

func explain(st core.Status, proto core.Protocol, port uint16) explanation {
	e := explanation{Protocol: proto, Port: port, Ports: []core.PortStatus{}, Refused: []core.Refusal{}, Nearest: []string{}, Sinks: orEmpty(st.Sinks)}
	for _, ps := range st.Ports {
		if ps.Protocol == proto && ps.HostPort == port {
			e.Ports = append(e.Ports, ps)
		}
	}
	for _, f := range st.Refused {
		if f.Port.Protocol == proto && f.Port.HostPort == port {
			e.Refused = append(e.Refused, f)
		}
	}
	if len(e.Ports) > 0 || len(e.Refused) > 0 {
		return e
	}
	// Nothing claims it: the nearest things that do.
	for _, ps := range st.Ports {
		for _, c := range ps.Claims {
			switch {
			case ps.HostPort == port:
				e.Nearest = append(e.Nearest, fmt.Sprintf("%s %s (%s, not %s) is claimed by %s", ps.Protocol, addrPort(ps.HostIP, ps.HostPort), ps.Protocol, proto, who(c.Key)))
			case c.ContainerPort == port && ps.Protocol == proto:
				e.Nearest = append(e.Nearest, fmt.Sprintf("%s publishes port %d on host port %s", who(c.Key), port, addrPort(ps.HostIP, ps.HostPort)))
			}
		}
	}
	for _, n := range st.Notes {
		for _, p := range n.Ports {
			if p.Protocol == proto && (p.ContainerPort == port || p.HostPort == port) {
				e.Nearest = append(e.Nearest, fmt.Sprintf("%s has port %d/%s, but %s", n.What, port, proto, n.Reason))
				break
			}
		}
	}
	for _, f := range st.Refused {
		if f.Port.ContainerPort == port && f.Port.Protocol == proto {
			e.Nearest = append(e.Nearest, fmt.Sprintf("%s's port %d on host port %d was refused: %s", who(f.Key), port, f.Port.HostPort, f.Reason))
		}
	}
	return e
}

// who names what claimed a port: "Docker container 4f1c…", "NAT rule
// tcp/30080".
// The noun of each source is its registration's (registry.SourcePlugin.Noun).
func who(k core.Key) string {
	if k.Source == k8sAPISource {
		return "Kubernetes API mapping " + k.ID
	}
	for _, p := range registry.Default.Sources() {
		if p.Name == k.Source && p.Noun != "" {
			return p.Noun + " " + k.ID
		}
	}
	return fmt.Sprintf("%s of source %s", k.ID, k.Source)
}

// sentences renders e in plain language.
func (e explanation) sentences(now time.Time) []string {
	name := fmt.Sprintf("%d/%s", e.Port, e.Protocol)
	if len(e.Ports) == 0 && len(e.Refused) == 0 {
		out := []string{fmt.Sprintf("Nothing claims host port %s: no source reports it, so no sink is asked to expose it.", name)}
		if len(e.Nearest) > 0 {
			out = append(out, "The nearest things that are claimed:")
			for _, n := range e.Nearest {
				out = append(out, "  - "+n+".")
			}
		}
		return out
	}
	var out []string
	down := map[string]string{}
	for _, s := range e.Sinks {
		if s.PeerDown {
			down[s.Name] = s.LastError
		}
	}
	for _, ps := range e.Ports {
		addr := addrPort(ps.HostIP, ps.HostPort)
		for i, c := range ps.Claims {
			line := fmt.Sprintf("%s %s is claimed by %s (container port %d", ps.Protocol, addr, who(c.Key), c.ContainerPort)
			if len(c.ConnectAddrs) > 0 {
				line += ", backend " + backendOf(c)
			}
			line += ")"
			switch {
			case c.Conflict != "":
				line += "; it is in conflict (" + c.Conflict + ") and takes over if that claim goes"
			case i > 0:
				line += "; it agrees with the first claim, so the two are one exposure"
			}
			out = append(out, line+".")
		}
		for _, at := range ps.Sinks {
			out = append(out, "  "+sinkSentence(at, now, down[at.Sink]))
		}
		if len(ps.Sinks) == 0 {
			out = append(out, "  No sink takes it (the sinks' filters leave it out).")
		}
	}
	for _, f := range e.Refused {
		out = append(out, fmt.Sprintf("%s %s from %s was not exposed: %s.", f.Port.Protocol, addrPort(f.Port.HostIP, f.Port.HostPort), who(f.Key), f.Reason))
	}
	return out
}

func sinkSentence(at core.PortAtSink, now time.Time, peerDown string) string {
	var s string
	switch at.State {
	case core.PortExposed:
		s = at.Sink + " holds it"
		if at.Held != "" {
			s += " as " + at.Held + " (its peer keeps one address per port)"
		}
	case core.PortPending:
		s = at.Sink + ": being sent"
	case core.PortRetrying:
		s = fmt.Sprintf("%s: the peer refused it (%s); next try in %s", at.Sink, at.Error, until(now, at.NextRetry))
		if !at.Since.IsZero() {
			s += ", failing since " + at.Since.Format("15:04:05")
		}
	case core.PortRejected:
		s = fmt.Sprintf("%s: the peer refused it for good (%s); it is tried again when the port changes", at.Sink, at.Error)
	case core.PortUnsupported:
		s = fmt.Sprintf("%s cannot take it: %s", at.Sink, at.Error)
	case core.PortElsewhere:
		s = fmt.Sprintf("%s already has it from another party, leading to the same place (%s); it works, and the agent will never remove it", at.Sink, at.Error)
	case core.PortConflict:
		s = fmt.Sprintf("%s: another party holds it with another target (%s); the agent takes it when that goes", at.Sink, at.Error)
	default:
		s = at.Sink + ": " + at.State
	}
	if peerDown != "" {
		s += "; the peer is unreachable now: " + peerDown
	}
	return s + "."
}
