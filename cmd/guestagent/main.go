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
	"strconv"
	"sync"
	"syscall"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/guestagent/guestagent/registry"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
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
	if err := applyGuestIP(fs, bound, cfg.tapIP); err != nil {
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
	log, limiter := newLogger(cfg.debug, stderr)
	defer func() { limiter.Stop(); _ = log.Sync() }()

	m := newMetrics()
	router, err := build(cfg, bound, log, stdout, m)
	if err != nil {
		fmt.Fprintln(stderr, "guestagent:", err)
		return 2
	}
	snap := newSnapshots(router)
	var listeners []net.Listener
	var names []string
	var handlers []http.Handler
	if cfg.statusAddr != "" {
		ln, err := listenStatus(cfg.statusAddr, cfg.statusAllowRemote)
		if err != nil {
			fmt.Fprintln(stderr, "guestagent:", err)
			return 2
		}
		h := statusHandler(snap, m, log)
		if cfg.pprof {
			h = withProfiles(h)
		}
		listeners, names, handlers = append(listeners, ln), append(names, "status and metrics"), append(handlers, h)
	}
	if cfg.controlSocket != "" {
		ln, err := listenControl(cfg.controlSocket, log)
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			fmt.Fprintln(stderr, "guestagent:", err)
			return 2
		}
		listeners, names, handlers = append(listeners, ln), append(names, "control socket"), append(handlers, statusHandler(snap, m, log))
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

// maxProfileSeconds bounds the seconds parameter of the profiles that run
// over time: profile, trace and the deltas (heap?seconds=N and the like).
const maxProfileSeconds = 60

// withProfiles serves the Go runtime's profiles under /debug/pprof/
// beside h. A profile that runs over time lasts at most maxProfileSeconds
// (more is refused with 400) and one runs at a time (another is refused
// with 429), since each costs the agent CPU while it runs.
func withProfiles(h http.Handler) http.Handler {
	profiles := http.NewServeMux()
	profiles.HandleFunc("GET /debug/pprof/", pprof.Index)
	profiles.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	profiles.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	profiles.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	profiles.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.Handle("/debug/pprof/", boundProfiles(profiles))
	return mux
}

// boundProfiles checks the duration of the profiles next serves and runs
// one timed profile at a time.
func boundProfiles(next http.Handler) http.Handler {
	running := make(chan struct{}, 1)
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		v := req.URL.Query().Get("seconds")
		trace := req.URL.Path == "/debug/pprof/trace"
		if v == "" && !trace && req.URL.Path != "/debug/pprof/profile" {
			next.ServeHTTP(w, req) // a snapshot, not timed
			return
		}
		if v != "" {
			sec, err := strconv.ParseFloat(v, 64)
			if !trace { // pprof reads an integer, and a fraction as its default
				var n int64
				n, err = strconv.ParseInt(v, 10, 64)
				sec = float64(n)
			}
			if err != nil || !(sec > 0 && sec <= maxProfileSeconds) {
				unit := "a whole number of seconds"
				if trace {
					unit = "a number of seconds"
				}
				http.Error(w, fmt.Sprintf("seconds=%q: want %s above 0 and at most %d", v, unit, maxProfileSeconds), http.StatusBadRequest)
				return
			}
		}
		select {
		case running <- struct{}{}:
			defer func() { <-running }()
		default:
			http.Error(w, "another profile or trace is running; one runs at a time", http.StatusTooManyRequests)
			return
		}
		// pprof moves the write deadline by the duration.
		next.ServeHTTP(w, req)
	})
}

// newLogger returns the agent's JSON logger on w, with repeated lines
// limited (see limitRepeats).
func newLogger(debugOn bool, w io.Writer) (*zap.Logger, *logLimiter) {
	level := zapcore.InfoLevel
	if debugOn {
		level = zapcore.DebugLevel
	}
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	ws := zapcore.Lock(zapcore.AddSync(w))
	core, limiter := limitRepeats(zapcore.NewCore(zapcore.NewJSONEncoder(enc), ws, level))
	return zap.New(core, zap.ErrorOutput(ws)), limiter
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
