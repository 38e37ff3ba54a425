// Package docker is the source that watches the Docker (moby) API: container
// start, stop and die events, and the published ports of running
// containers. After every (re)connect it lists the running containers and
// reports them all, so nothing that happened while it was away is missed or
// leaked. Ports published on 127.0.0.1 also get loopback NAT rules, which
// let them answer on the guest's address for traffic from the host's tunnel
// and nothing else (see sources/internal/loopbacknat).
package docker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
	"github.com/guestagent/guestagent/sources/internal/reconnect"
)

// Name is the source's registry name.
const Name = "docker"

// DefaultHost is Docker's standard socket.
const DefaultHost = "unix:///var/run/docker.sock"

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "containers' published ports from the Docker (moby) API",
		Noun:    "Docker container",
		Enable: &registry.Enable{Flag: "docker",
			Usage: "watch the Docker (moby) API for container start/stop/die and their published ports"},
		GuestAddrFlags: []string{Name + "NATGuestIP"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.Host, "dockerHost", defaultHost(), "Docker API address (default from DOCKER_HOST, else the standard socket)")
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

// defaultHost is the --dockerHost default: $DOCKER_HOST, else DefaultHost.
func defaultHost() string {
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		return h
	}
	return DefaultHost
}

// Config configures a Source.
type Config struct {
	// Host is the Docker API address, e.g. unix:///var/run/docker.sock
	// (--dockerHost); empty means $DOCKER_HOST, else DefaultHost.
	Host string
	// LoopbackNAT sets up the loopback NAT rules for bindings on
	// 127.0.0.1, next to Docker's own in its DOCKER chain. The zero value
	// keeps no rules; the --dockerLoopbackNAT flag turns them on by
	// default.
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

// Source watches one Docker daemon.
type Source struct {
	cfg Config
	nat *loopbacknat.Manager // nil when the rules are off
	log *zap.Logger
}

// New checks cfg and returns a Source, with its loopback NAT manager when
// cfg.LoopbackNAT turns the rules on (the iptables command must then run).
func New(cfg Config) (*Source, error) {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	nat, err := cfg.LoopbackNAT.Manager(Name, "DOCKER", cfg.Entries, cfg.Log)
	if err != nil {
		return nil, err
	}
	if cfg.Host == "" {
		cfg.Host = defaultHost()
	}
	if _, err := client.ParseHostURL(cfg.Host); err != nil {
		return nil, fmt.Errorf("--dockerHost %q: %w", cfg.Host, err)
	}
	if cfg.Backoff.Initial <= 0 {
		cfg.Backoff = core.Backoff{Initial: core.DefaultBackoff.Initial, Max: 10 * time.Second}
	}
	return &Source{cfg: cfg, nat: nat, log: cfg.Log.With(zap.String("source", Name))}, nil
}

// Run watches the daemon until ctx is done, reconnecting with backoff.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	cli, err := client.New(client.WithHost(s.cfg.Host))
	if err != nil {
		return fmt.Errorf("docker client: %w", err)
	}
	defer cli.Close()
	if s.nat != nil {
		qctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { s.nat.RunQueue(qctx) })
		defer func() { cancel(); wg.Wait() }()
	}
	reconnect.Loop(ctx, s.log.With(zap.String("host", s.cfg.Host)), s.cfg.Backoff, "Docker API",
		func(ctx context.Context) (bool, error) { return s.session(ctx, cli, out) })
	return nil
}

// session subscribes to events, reports every running container, then
// follows events until the stream breaks. connected tells whether the
// daemon answered at all.
func (s *Source) session(ctx context.Context, cli *client.Client, out core.Emitter) (connected bool, err error) {
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = cli.Ping(pctx, client.PingOptions{NegotiateAPIVersion: true})
	cancel()
	if err != nil {
		return false, err
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	// Subscribe before listing, so that nothing starting in between is lost.
	stream := cli.Events(sctx, client.EventsListOptions{Filters: make(client.Filters).
		Add("type", string(events.ContainerEventType)).
		Add("event", string(events.ActionStart), string(events.ActionStop), string(events.ActionDie))})
	if err := s.resync(ctx, cli, out); err != nil {
		return true, err
	}
	s.log.Info("watching Docker events", zap.String("host", s.cfg.Host))
	for {
		select {
		case <-ctx.Done():
			return true, nil
		case err := <-stream.Err:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return true, err
		case msg := <-stream.Messages:
			s.handle(ctx, cli, out, msg)
		}
	}
}

// resync lists running containers and reports exactly them.
func (s *Source) resync(ctx context.Context, cli *client.Client, out core.Emitter) error {
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	list, err := cli.ContainerList(lctx, client.ContainerListOptions{Filters: make(client.Filters).Add("status", "running")})
	if err != nil {
		return fmt.Errorf("listing containers: %w", err)
	}
	var ms []core.Mapping
	rules := map[string][]loopbacknat.Binding{}
	for _, c := range list.Items {
		info, err := cli.ContainerInspect(lctx, c.ID, client.ContainerInspectOptions{})
		if cerrdefs.IsNotFound(err) {
			continue // gone since the listing
		}
		if err != nil {
			return fmt.Errorf("inspecting %s: %w", short(c.ID), err)
		}
		m, loopback := s.convert(info.Container)
		if len(m.Ports) > 0 {
			ms = append(ms, m)
		}
		if len(loopback) > 0 {
			rules[c.ID] = loopback
		}
	}
	if s.nat != nil {
		if err := s.nat.Sync(rules); err != nil {
			s.log.Error("loopback NAT rules", zap.Error(err))
		}
	}
	out.Snapshot(ms)
	s.log.Info("synced running containers", zap.Int("running", len(list.Items)), zap.Int("with_ports", len(ms)))
	return nil
}

func (s *Source) handle(ctx context.Context, cli *client.Client, out core.Emitter, msg events.Message) {
	id := msg.Actor.ID
	if id == "" {
		s.log.Warn("container event without an id ignored", zap.String("action", string(msg.Action)))
		return
	}
	switch msg.Action {
	case events.ActionStart:
		ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
		info, err := cli.ContainerInspect(ictx, id, client.ContainerInspectOptions{})
		cancel()
		if cerrdefs.IsNotFound(err) {
			s.remove(out, id)
			return
		}
		if err != nil {
			// The stream usually breaks too, and the resync catches up.
			s.log.Error("inspecting started container", zap.String("container", short(id)), zap.Error(err))
			return
		}
		if info.Container.State == nil || !info.Container.State.Running {
			s.remove(out, id) // it stopped again before we looked
			return
		}
		m, loopback := s.convert(info.Container)
		s.log.Debug("container started", zap.String("container", short(id)), zap.Int("ports", len(m.Ports)))
		out.Set(m)
		if s.nat != nil {
			s.nat.Queue(id, loopback)
		}
	case events.ActionStop, events.ActionDie:
		s.log.Debug("container ended", zap.String("container", short(id)), zap.String("action", string(msg.Action)))
		s.remove(out, id)
	}
}

func (s *Source) remove(out core.Emitter, id string) {
	out.Delete(id)
	if s.nat != nil {
		s.nat.Queue(id, nil)
	}
}

// convert turns an inspected container into its mapping and its loopback
// bindings, logging the bindings it cannot use.
func (s *Source) convert(c container.InspectResponse) (core.Mapping, []loopbacknat.Binding) {
	m, loopback, problems := Convert(c)
	for _, err := range problems {
		s.log.Warn("port binding skipped", zap.String("container", short(c.ID)), zap.Error(err))
	}
	return m, loopback
}

// Convert returns the mapping of an inspected container (every published
// binding, per protocol and address family), the bindings on 127.0.0.1 that
// need loopback NAT rules, and the bindings it had to skip.
func Convert(c container.InspectResponse) (core.Mapping, []loopbacknat.Binding, []error) {
	m := core.Mapping{Key: core.Key{Source: Name, ID: c.ID}}
	if c.NetworkSettings == nil {
		return m, nil, nil
	}
	backend := containerIP(c)
	var loopback []loopbacknat.Binding
	var problems []error
	keys := slices.SortedFunc(maps.Keys(c.NetworkSettings.Ports), func(a, b network.Port) int {
		return cmp.Or(cmp.Compare(a.Num(), b.Num()), cmp.Compare(a.Proto(), b.Proto()))
	})
	for _, k := range keys {
		proto, err := core.ParseProtocol(string(k.Proto()))
		if err != nil || k.Num() == 0 {
			problems = append(problems, fmt.Errorf("port %q: unusable port or protocol", k.String()))
			continue
		}
		for _, b := range c.NetworkSettings.Ports[k] {
			hp, err := strconv.ParseUint(b.HostPort, 10, 16)
			if err != nil || hp == 0 {
				problems = append(problems, fmt.Errorf("port %s: host port %q is not 1-65535", k, b.HostPort))
				continue
			}
			p := core.Port{Protocol: proto, ContainerPort: k.Num(), HostIP: b.HostIP, HostPort: uint16(hp)}
			m.Ports = append(m.Ports, p)
			if b.HostIP == netip.AddrFrom4([4]byte{127, 0, 0, 1}) && backend.IsValid() {
				loopback = append(loopback, loopbacknat.Binding{
					Protocol: proto, HostPort: p.HostPort, Backend: netip.AddrPortFrom(backend, k.Num()),
				})
			}
		}
	}
	return m.Normalize(), loopback, problems
}

// containerIP picks the container's IPv4 address: on the default bridge if
// it has one there, else on the first network by name.
func containerIP(c container.InspectResponse) netip.Addr {
	nets := c.NetworkSettings.Networks
	if n, ok := nets["bridge"]; ok && n != nil && n.IPAddress.Is4() {
		return n.IPAddress
	}
	for _, name := range slices.Sorted(maps.Keys(nets)) {
		if n := nets[name]; n != nil && n.IPAddress.Is4() {
			return n.IPAddress
		}
	}
	return netip.Addr{}
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// Interface guards.
var (
	_ core.Source = (*Source)(nil)
)
