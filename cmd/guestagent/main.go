// Command guestagent watches container engines, Kubernetes and the kernel's
// NAT rules for ports that must be exposed, and delivers normalised port
// mappings to the processes that expose them on the host.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/vtunnel"
	"github.com/guestagent/guestagent/sinks/wslproxy"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// sourceFlag is one of the Rancher Desktop-compatible boolean flags that
// enable a source.
type sourceFlag struct {
	flag, plugin, usage string
	def                 bool
}

var sourceFlags = []sourceFlag{
	{"docker", "docker", "watch the Docker (moby) API for container start/stop/die and their published ports", false},
	{"containerd", "containerd", "watch the containerd API for /tasks/start, /containers/update and /tasks/exit", false},
	{"kubernetes", "kubernetes", "watch Kubernetes services of type NodePort and LoadBalancer", false},
	{"iptables", "iptables", "with --kubernetes: scan kube-proxy's NAT rules for service ports and open their listeners", true},
	{"sockets", "sockets", "expose the listening sockets of the agent's network namespace (host-network containers and pods, plain processes); default: on in network-tunnel mode (--adminInstall), off otherwise", false},
}

// k8sAPISource is the name under which the static Kubernetes API mapping is
// reported.
const k8sAPISource = "k8s-api"

// config is the parsed command line.
type config struct {
	debug, showVersion      bool
	sources, sinks          []string
	adminInstall, privSvc   bool
	wslIntegration          bool
	k8sListener             string
	k8sAPIPort              int
	unexposeOnExit          bool
	statusAddr              string
	statusAllowRemote       bool
	pprof                   bool
	controlSocket           string
	stateDir                string
	tapIP                   string
	enabled                 map[string]*bool // by plugin name
	socketsGiven            bool             // --sockets was on the command line
	general, mode, enabling *pflag.FlagSet
}

func defineFlags(fs *pflag.FlagSet) *config {
	c := &config{enabled: map[string]*bool{}}
	c.general = pflag.NewFlagSet("general", pflag.ContinueOnError)
	c.general.BoolVar(&c.debug, "debug", false, "debug logging")
	c.general.BoolVar(&c.showVersion, "version", false, "print the version and exit")
	c.general.StringSliceVar(&c.sources, "sources", nil, "more sources to enable by name, comma-separated (see the list below)")
	c.general.StringSliceVar(&c.sinks, "sinks", []string{"auto"}, `sinks to deliver to by name, comma-separated; "auto" means the ones the networking mode selects`)
	c.general.BoolVar(&c.unexposeOnExit, "unexposeOnExit", true, "on SIGINT/SIGTERM, remove every exposed port before exiting")
	c.general.StringVar(&c.stateDir, "stateDir", "/var/lib/guestagent", "directory of the ownership records: which ports this agent exposed on each sink, so that after a restart (or a crash) it removes exactly its own leftovers and never another party's; empty keeps them in memory only")
	c.general.StringVar(&c.controlSocket, "controlSocket", DefaultControlSocket, "unix socket (root only) on which the agent serves its state to 'guestagent status', 'watch' and 'explain'; empty: off")
	c.general.BoolVar(&c.statusAllowRemote, "statusAllowRemote", false, "let --statusAddr listen on an address other than loopback (anyone who reaches it reads the agent's state)")
	c.general.StringVar(&c.statusAddr, "statusAddr", "", "serve GET /status (current mappings, JSON) and GET /metrics (Prometheus) on this address, e.g. 127.0.0.1:9901; empty: off")
	c.general.BoolVar(&c.pprof, "pprof", false, "with --statusAddr: also serve the Go runtime's profiles (heap, goroutines, CPU) under /debug/pprof/ there, for 'go tool pprof http://ADDR/debug/pprof/heap'")

	c.mode = pflag.NewFlagSet("mode", pflag.ContinueOnError)
	c.mode.BoolVar(&c.adminInstall, "adminInstall", false, "network-tunnel mode: forward to host-switch's API as bound (the agent runs in its own network namespace)")
	c.mode.BoolVar(&c.privSvc, "privilegedService", false, "privileged-service mode: forward over the vtunnel peer to the privileged host service")
	c.mode.BoolVar(&c.wslIntegration, "wslIntegration", true, "also send mappings to wsl-proxy so other WSL distributions reach them (not in privileged-service mode)")
	c.mode.StringVar(&c.k8sListener, "k8sServiceListenerAddr", "127.0.0.1", "IP to bind Kubernetes services on the host: 0.0.0.0 or 127.0.0.1")
	c.mode.IntVar(&c.k8sAPIPort, "k8sAPIPort", 6443, "Kubernetes API port announced to wsl-proxy so other distributions can use kubectl")
	c.mode.StringVar(&c.tapIP, "tap-interface-ip", "", "this guest's address on the virtual network, for every plugin that needs it (--hostSwitchGuestIP and the loopback NAT guest addresses, unless given); the name Rancher Desktop's agent uses")

	c.enabling = pflag.NewFlagSet("sources", pflag.ContinueOnError)
	for _, s := range sourceFlags {
		c.enabled[s.plugin] = c.enabling.Bool(s.flag, s.def, s.usage)
	}
	fs.AddFlagSet(c.general)
	fs.AddFlagSet(c.mode)
	fs.AddFlagSet(c.enabling)
	return c
}

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && isCommand(args[0]) {
		return runCommand(ctx, args[0], args[1:], stdout, stderr)
	}
	fs := pflag.NewFlagSet("guestagent", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg := defineFlags(fs)
	bound, err := registry.Bind(fs)
	if err != nil {
		fmt.Fprintln(stderr, "guestagent:", err)
		return 2
	}
	if err := fs.Parse(longFlags(fs, args)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			usage(stdout, cfg, bound)
			return 0
		}
		fmt.Fprintf(stderr, "guestagent: %v\nRun 'guestagent --help' for the flags.\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "guestagent: unexpected arguments %q\n", fs.Args())
		return 2
	}
	cfg.socketsGiven = fs.Changed("sockets")
	if err := applyGuestIP(fs, cfg.tapIP); err != nil {
		fmt.Fprintln(stderr, "guestagent:", err)
		return 2
	}
	if cfg.showVersion {
		fmt.Fprintln(stdout, "guestagent", versionString())
		return 0
	}
	if cfg.pprof && cfg.statusAddr == "" {
		fmt.Fprintln(stderr, "guestagent: --pprof needs --statusAddr")
		return 2
	}
	log := newLogger(cfg.debug, stderr)
	defer func() { _ = log.Sync() }()

	m := newMetrics()
	router, err := build(cfg, bound, log, stdout, m)
	if err != nil {
		fmt.Fprintln(stderr, "guestagent:", err)
		return 2
	}
	handler := statusHandler(router, m)
	var listeners []net.Listener
	var names []string
	var handlers []http.Handler
	if cfg.statusAddr != "" {
		ln, err := listenStatus(cfg.statusAddr, cfg.statusAllowRemote)
		if err != nil {
			fmt.Fprintln(stderr, "guestagent:", err)
			return 2
		}
		h := handler
		if cfg.pprof {
			h = withProfiles(handler)
		}
		listeners, names, handlers = append(listeners, ln), append(names, "status and metrics"), append(handlers, h)
	}
	if cfg.controlSocket != "" {
		ln, err := listenControl(cfg.controlSocket)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			fmt.Fprintln(stderr, "guestagent:", err)
			return 2
		}
		listeners, names, handlers = append(listeners, ln), append(names, "control socket"), append(handlers, handler)
	}
	log.Info("guestagent starting", zap.String("version", versionString()))
	sctx, stopServing := context.WithCancel(ctx)
	var serving sync.WaitGroup
	for i, ln := range listeners {
		serving.Go(func() { serveHTTP(sctx, ln, handlers[i], log, names[i]) })
	}
	defer func() { stopServing(); serving.Wait() }()
	if err := router.Run(ctx); err != nil {
		log.Error("stopped with an error", zap.Error(err))
		return 1
	}
	log.Info("guestagent stopped")
	return 0
}

// build checks the configuration and wires the selected plugins into a
// router.
func build(cfg *config, bound *registry.Bound, log *zap.Logger, stdout io.Writer, m *metrics) (*core.Router, error) {
	mode, err := core.ModeFromFlags(cfg.adminInstall, cfg.privSvc)
	if err != nil {
		return nil, err
	}
	listener, err := netip.ParseAddr(cfg.k8sListener)
	if err != nil || (listener != netip.IPv4Unspecified() && listener != netip.AddrFrom4([4]byte{127, 0, 0, 1})) {
		return nil, fmt.Errorf("--k8sServiceListenerAddr %q is invalid: valid options are 0.0.0.0 and 127.0.0.1", cfg.k8sListener)
	}
	if cfg.k8sAPIPort < 1 || cfg.k8sAPIPort > 65535 {
		return nil, fmt.Errorf("--k8sAPIPort %d is out of range 1-65535", cfg.k8sAPIPort)
	}
	env := registry.Env{Log: log, Stdout: stdout, Options: registry.Options{
		Mode:                   mode,
		K8sServiceListenerAddr: listener,
		K8sAPIPort:             uint16(cfg.k8sAPIPort),
	}}
	kubernetes := *cfg.enabled["kubernetes"]

	var sourceNames []string
	for _, s := range sourceFlags {
		on := *cfg.enabled[s.plugin]
		switch s.plugin {
		case "iptables":
			on = on && kubernetes
		case "sockets":
			if !cfg.socketsGiven {
				on = mode == core.ModeTunnel
			}
		}
		if on {
			sourceNames = append(sourceNames, s.plugin)
		}
	}
	sourceNames = dedupe(append(sourceNames, cfg.sources...))
	if len(sourceNames) == 0 {
		return nil, errors.New("no source enabled: use --docker, --containerd, --kubernetes, --sockets or --sources NAME")
	}
	var sinkNames []string
	for _, n := range cfg.sinks {
		if n == "auto" {
			sinkNames = append(sinkNames, modeSinks(mode, cfg.wslIntegration)...)
		} else {
			sinkNames = append(sinkNames, n)
		}
	}
	sinkNames = dedupe(sinkNames)
	if len(sinkNames) == 0 {
		return nil, errors.New("no sink selected: --sinks is empty")
	}

	if cfg.stateDir != "" {
		if err := os.MkdirAll(cfg.stateDir, 0o700); err != nil {
			return nil, fmt.Errorf("--stateDir: %w", err)
		}
	}
	router := core.NewRouter(core.RouterConfig{
		Log:          log,
		Policy:       mode.Policy(),
		DrainTimeout: drainTimeout(cfg.unexposeOnExit),
		StateDir:     cfg.stateDir,
		Delivered:    m.delivered,
	})
	for _, n := range sourceNames {
		src, err := bound.NewSource(n, env)
		if err != nil {
			return nil, err
		}
		router.AddSource(n, src)
	}
	if kubernetes {
		router.AddSource(k8sAPISource, k8sAPIMapping(uint16(cfg.k8sAPIPort)))
	}
	for _, n := range sinkNames {
		snk, err := bound.NewSink(n, env)
		if err != nil {
			return nil, err
		}
		router.AddSink(n, snk, acceptFor(n))
	}
	log.Info("configuration",
		zap.Stringer("mode", mode),
		zap.Strings("sources", sourceNames),
		zap.Strings("sinks", sinkNames))
	return router, nil
}

// listenStatus opens the TCP status endpoint; an address other than
// loopback needs allowRemote.
func listenStatus(addr string, allowRemote bool) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("--statusAddr %q: %w", addr, err)
	}
	if ip, err := netip.ParseAddr(host); (err != nil || !ip.IsLoopback()) && host != "localhost" && !allowRemote {
		return nil, fmt.Errorf("--statusAddr %q is not a loopback address; anyone who reaches it reads the agent's state (add --statusAllowRemote to allow it)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--statusAddr: %w", err)
	}
	return ln, nil
}

// withProfiles serves the Go runtime's profiles under /debug/pprof/
// beside h.
func withProfiles(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	return mux
}

// guestIPFlags are the flags --tap-interface-ip sets.
var guestIPFlags = []string{"hostSwitchGuestIP", "dockerNATGuestIP", "containerdNATGuestIP"}

// applyGuestIP sets each plugin's guest address flag that was not given to
// ip, when ip is set.
func applyGuestIP(fs *pflag.FlagSet, ip string) error {
	if ip == "" {
		return nil
	}
	if a, err := netip.ParseAddr(ip); err != nil || !a.Is4() {
		return fmt.Errorf("--tap-interface-ip %q is not an IPv4 address", ip)
	}
	for _, name := range guestIPFlags {
		if f := fs.Lookup(name); f != nil && !f.Changed {
			if err := f.Value.Set(ip); err != nil {
				return fmt.Errorf("--tap-interface-ip: --%s: %w", name, err)
			}
		}
	}
	return nil
}

func drainTimeout(on bool) time.Duration {
	if on {
		return 5 * time.Second
	}
	return 0
}

// modeSinks returns the names of the sinks a networking mode delivers to;
// wsl adds the copy to wsl-proxy that WSL integration needs.
func modeSinks(m core.Mode, wsl bool) []string {
	switch {
	case m == core.ModePrivileged:
		return []string{vtunnel.Name}
	case wsl:
		return []string{hostswitch.Name, wslproxy.Name}
	default:
		return []string{hostswitch.Name}
	}
}

// acceptFor keeps the static Kubernetes API mapping away from the sinks
// that expose ports on the host: only wsl-proxy (and the debugging sinks)
// want it.
func acceptFor(sink string) func(core.Key) bool {
	if sink == hostswitch.Name || sink == vtunnel.Name {
		return func(k core.Key) bool { return k.Source != k8sAPISource }
	}
	return nil
}

// k8sAPIMapping reports the one static mapping of the Kubernetes API port.
func k8sAPIMapping(port uint16) core.Source {
	return core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
		out.Snapshot([]core.Mapping{{
			Key: core.Key{ID: "api-server"},
			Ports: []core.Port{{
				Protocol: core.TCP, ContainerPort: port,
				HostIP: netip.AddrFrom4([4]byte{127, 0, 0, 1}), HostPort: port,
			}},
		}})
		<-ctx.Done()
		return nil
	})
}

func dedupe(names []string) []string {
	var out []string
	for _, n := range names {
		n = strings.TrimSpace(n)
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
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

func newLogger(debugOn bool, w io.Writer) *zap.Logger {
	level := zapcore.InfoLevel
	if debugOn {
		level = zapcore.DebugLevel
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	ws := zapcore.Lock(zapcore.AddSync(w))
	return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(enc), ws, level), zap.ErrorOutput(ws))
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
