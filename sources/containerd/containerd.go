// Package containerd is the source that watches the containerd API for
// /tasks/start, /containers/update and /tasks/exit in every namespace, and
// reads each container's ports from what nerdctl records (its state
// directory's network-config.json, or the nerdctl/ports label).
//
// All namespaces are watched: nerdctl uses "default" unless told
// otherwise, and may be told "k8s.io". nerdctl's labels are honoured on
// every container but those of containerd's CRI plugin (the ones labelled
// io.cri-containerd.kind, in whatever namespace): CRI copies an image's
// LABELs into its containers' labels, so an image that says
// nerdctl/ports would otherwise claim host ports its pod never publishes.
// Other containers without nerdctl port data (buildkit's) cost one label
// read and nothing else.
//
// A state directory is used only if it is an absolute, clean path under
// nerdctl's data root (Config.NerdctlDataRoot), reached without a symbolic
// link, and its network-config.json is a regular file of at most 1 MiB,
// opened so that neither a FIFO nor a device can block or flood the
// source. A container refused for any of these reasons is logged once, at
// warn level, and reported without ports (port data that does not parse
// is logged once too, at error level); other containers are not affected.
//
// After every (re)connect the source lists every namespace's containers
// with a running task and reports them as one snapshot, so nothing that
// happened while it was away is missed or leaked; it reconnects with
// backoff. Ports published on 127.0.0.1 also get loopback NAT rules in the
// container's CNI-DN chain (see sources/internal/loopbacknat and
// loopback.go).
package containerd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"strings"
	"sync"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	apitypes "github.com/containerd/containerd/api/types"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	cerrdefs "github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
	"github.com/guestagent/guestagent/sources/internal/reconnect"
)

// Name is the source's registry name.
const Name = "containerd"

// DefaultSocket is where k3s's containerd listens.
const DefaultSocket = "/run/k3s/containerd/containerd.sock"

// Event topics the source follows.
const (
	topicTaskStart       = "/tasks/start"
	topicContainerUpdate = "/containers/update"
	topicTaskExit        = "/tasks/exit"
)

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "containers' ports from the containerd API and nerdctl's port data",
		Noun:    "containerd container",
		Enable: &registry.Enable{Flag: "containerd",
			Usage: "watch the containerd API for /tasks/start, /containers/update and /tasks/exit"},
		GuestAddrFlags: []string{Name + "NATGuestIP"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.Socket, "containerdSock", DefaultSocket, "containerd socket path")
			registry.NonEmptyStringVar(fs, &cfg.NerdctlDataRoot, "containerdNerdctlDataRoot", DefaultNerdctlDataRoot,
				"nerdctl's data root (its --data-root): only state directories under it are read")
			loopbacknat.BindFlags(fs, Name, &cfg.LoopbackNAT)
			return func(env registry.Env) (core.Source, error) {
				cfg := cfg
				cfg.Log = env.Log
				cfg.Entries = env.Options.Entries
				return New(cfg)
			}
		},
	})
}

// Config configures a Source.
type Config struct {
	// Socket is containerd's socket path (--containerdSock); empty means
	// DefaultSocket.
	Socket string
	// NerdctlDataRoot is nerdctl's data root (--containerdNerdctlDataRoot),
	// an absolute, clean path; empty means DefaultNerdctlDataRoot. A
	// container's nerdctl/state-dir is read only if it is under it.
	NerdctlDataRoot string
	// LoopbackNAT sets up the loopback NAT rules for bindings on
	// 127.0.0.1, next to the CNI portmap plugin's rules in each
	// container's CNI-DN chain, so that they answer on the guest's address
	// through the host's tunnel. The zero value keeps no rules; the
	// --containerdLoopbackNAT flag turns them on by default.
	LoopbackNAT loopbacknat.Options
	// Entries are the selected sinks' ways into the guest besides the
	// tunnel (registry.Options.Entries): with the loopback NAT rules on,
	// each binding on 127.0.0.1 answers there too.
	Entries []registry.Entry
	// Backoff bounds reconnect delays (default core.DefaultBackoff, capped
	// at 10s).
	Backoff core.Backoff
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source watches one containerd.
type Source struct {
	cfg Config
	nat *loopbacknat.Manager // nil when the rules are off
	log *zap.Logger

	// said holds, by mapping id, what was last logged about a container's
	// port data, so that it is logged once per container, not per event.
	// Only Run's goroutine uses it; the resync forgets the containers
	// that are gone.
	said map[string]string
}

// New checks cfg and returns a Source, with its loopback NAT manager when
// cfg.LoopbackNAT turns the rules on (the iptables command must then run).
func New(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	nat, err := cfg.LoopbackNAT.Manager(Name, "", cfg.Entries, cfg.Log)
	if err != nil {
		return nil, err
	}
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.NerdctlDataRoot == "" {
		cfg.NerdctlDataRoot = DefaultNerdctlDataRoot
	}
	if err := checkDataRoot(cfg.NerdctlDataRoot); err != nil {
		return nil, fmt.Errorf("--containerdNerdctlDataRoot %w", err)
	}
	if cfg.Backoff.Initial <= 0 {
		cfg.Backoff = core.Backoff{Initial: core.DefaultBackoff.Initial, Max: 10 * time.Second}
	}
	return &Source{cfg: cfg, nat: nat, log: cfg.Log.With(zap.String("source", Name)), said: map[string]string{}}, nil
}

// ID returns the mapping id of a container: ids are unique per namespace.
func ID(namespace, container string) string { return namespace + "/" + container }

// Run watches containerd until ctx is done, reconnecting with backoff.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	if s.nat != nil {
		qctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { s.nat.RunQueue(qctx) })
		defer func() { cancel(); wg.Wait() }()
	}
	reconnect.Loop(ctx, s.log.With(zap.String("socket", s.cfg.Socket)), s.cfg.Backoff, "containerd",
		func(ctx context.Context) (bool, error) { return s.session(ctx, out) })
	return nil
}

func (s *Source) session(ctx context.Context, out core.Emitter) (connected bool, err error) {
	if _, err := os.Stat(s.cfg.Socket); err != nil {
		return false, err
	}
	e, err := dial(s.cfg.Socket, 5*time.Second)
	if err != nil {
		return false, err
	}
	defer e.conn.Close()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	serving, err := e.serving(sctx)
	cancel()
	if err != nil || !serving {
		return false, fmt.Errorf("containerd is not serving: %w", err)
	}
	ectx, stop := context.WithCancel(ctx)
	defer stop()
	// Subscribe before listing, so that nothing starting in between is lost;
	// the stream holds what arrives while the list is read.
	stream, subErr := e.events.Subscribe(ectx, &eventsapi.SubscribeRequest{Filters: []string{
		`topic=="` + topicTaskStart + `"`, `topic=="` + topicContainerUpdate + `"`, `topic=="` + topicTaskExit + `"`}})
	if err := s.resync(ctx, e, out); err != nil {
		return true, err
	}
	if subErr != nil {
		return true, errgrpc.ToNative(subErr)
	}
	s.log.Info("watching containerd events", zap.String("socket", s.cfg.Socket))
	for {
		env, err := stream.Recv()
		if ctx.Err() != nil {
			return true, nil
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				err = errgrpc.ToNative(err)
			}
			return true, err
		}
		s.handle(ctx, e, out, env)
	}
}

// resync reports every container with a running task, in every namespace.
func (s *Source) resync(ctx context.Context, e *engine, out core.Emitter) error {
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nss, err := e.listNamespaces(lctx)
	if err != nil {
		return fmt.Errorf("listing namespaces: %w", err)
	}
	var ms []core.Mapping
	rules := map[string][]loopbacknat.Binding{}
	running := 0
	listed := map[string]bool{}
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(lctx, ns)
		ctrs, err := e.listContainers(nctx)
		if err != nil {
			return fmt.Errorf("listing containers in %s: %w", ns, err)
		}
		for _, c := range ctrs {
			listed[ID(ns, c.ID)] = true
			proc, err := e.task(nctx, c.ID)
			if cerrdefs.IsNotFound(err) {
				continue
			}
			if err != nil {
				return fmt.Errorf("task of %s/%s: %w", ns, c.ID, err)
			}
			if proc.Status != tasktypes.Status_RUNNING {
				continue
			}
			running++
			m, bindings := s.mapping(ns, c.ID, c.Labels, proc.Pid)
			if len(m.Ports) > 0 {
				ms = append(ms, m)
			}
			if len(bindings) > 0 {
				rules[m.ID] = bindings
			}
		}
	}
	maps.DeleteFunc(s.said, func(key, _ string) bool { return !listed[key] })
	if s.nat != nil {
		if err := s.nat.Sync(rules); err != nil {
			s.log.Error("loopback NAT rules", zap.Error(err))
		}
	}
	out.Snapshot(ms)
	s.log.Info("synced running containers", zap.Int("namespaces", len(nss)), zap.Int("running", running), zap.Int("with_ports", len(ms)))
	return nil
}

func (s *Source) handle(ctx context.Context, e *engine, out core.Emitter, env *apitypes.Envelope) {
	if env.Event == nil {
		s.log.Warn("event without payload ignored", zap.String("topic", env.Topic))
		return
	}
	payload, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		s.log.Warn("undecodable event ignored", zap.String("topic", env.Topic), zap.Error(err))
		return
	}
	nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, env.Namespace), 10*time.Second)
	defer cancel()
	switch ev := payload.(type) {
	case *apievents.TaskStart:
		s.refresh(nctx, e, out, env.Namespace, ev.ContainerID)
	case *apievents.ContainerUpdate:
		s.refresh(nctx, e, out, env.Namespace, ev.ID)
	case *apievents.TaskExit:
		if ev.ID != "" && ev.ID != ev.ContainerID {
			return // an exec'd process, not the container's own
		}
		s.remove(out, ID(env.Namespace, ev.ContainerID))
	default:
		s.log.Debug("event ignored", zap.String("topic", env.Topic))
	}
}

// refresh reports a container as it is now: its ports if its task runs,
// nothing otherwise. An update of labels thus becomes a remove of the old
// ports and an add of the new in the router.
func (s *Source) refresh(ctx context.Context, e *engine, out core.Emitter, ns, id string) {
	key := ID(ns, id)
	c, err := e.container(ctx, id)
	if cerrdefs.IsNotFound(err) {
		delete(s.said, key)
		s.remove(out, key)
		return
	}
	if err != nil {
		s.log.Error("loading container", zap.String("container", key), zap.Error(err))
		return
	}
	proc, err := e.task(ctx, id)
	if err != nil {
		if !cerrdefs.IsNotFound(err) {
			s.log.Error("loading task", zap.String("container", key), zap.Error(err))
		}
		s.remove(out, key)
		return
	}
	if proc.Status != tasktypes.Status_RUNNING {
		s.remove(out, key)
		return
	}
	m, bindings := s.mapping(ns, id, c.Labels, proc.Pid)
	out.Set(m)
	if s.nat != nil {
		s.nat.Queue(key, bindings)
	}
}

func (s *Source) remove(out core.Emitter, key string) {
	out.Delete(key)
	if s.nat != nil {
		s.nat.Queue(key, nil)
	}
}

// mapping builds a container's mapping and, for its 127.0.0.1 bindings,
// the loopback NAT bindings, logging (once) what it has to refuse or skip.
func (s *Source) mapping(ns, id string, labels map[string]string, pid uint32) (core.Mapping, []loopbacknat.Binding) {
	key := ID(ns, id)
	m := core.Mapping{Key: core.Key{Source: Name, ID: key}}
	ports, skipped, err := NerdctlPorts(s.cfg.NerdctlDataRoot, labels)
	if s.news(key, err, skipped) {
		log := s.log.With(zap.String("container", key))
		switch {
		case errors.Is(err, ErrRefused):
			log.Warn("container's port data refused; container reported without ports", zap.Error(err))
		case err != nil:
			log.Error("container's port data unusable; container reported without ports", zap.Error(err))
		}
		for _, e := range skipped {
			log.Warn("port mapping skipped", zap.Error(e))
		}
	}
	if err != nil {
		return m, nil
	}
	m.Ports = ports
	if s.nat == nil {
		return m, nil
	}
	return m, s.loopback(ns, id, labels, pid, ports)
}

// news reports whether err and skipped say something about container key
// that was not the last thing logged about it, and remembers it.
func (s *Source) news(key string, err error, skipped []error) bool {
	var b strings.Builder
	if err != nil {
		b.WriteString(err.Error())
	}
	for _, e := range skipped {
		b.WriteString("\n" + e.Error())
	}
	said := b.String()
	if said == "" {
		delete(s.said, key)
		return false
	}
	if s.said[key] == said {
		return false
	}
	s.said[key] = said
	return true
}

// Interface guards.
var (
	_ core.Source = (*Source)(nil)
)
