// Package kubernetes is the source that watches Kubernetes services of type
// NodePort and LoadBalancer with a client-go informer. A NodePort service
// exposes each port's node port, a LoadBalancer service each port's port,
// bound on the host at --k8sServiceListenerAddr.
//
// On a desktop the kubeconfig and the API server appear minutes after the
// agent starts, and the cluster can be reset: the source waits for the
// file, lets the informer retry the connection, and starts over (with a
// full resync) when the file changes.
package kubernetes

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/cache"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "kubernetes"

// DefaultKubeconfig is where k3s writes its kubeconfig.
const DefaultKubeconfig = "/etc/rancher/k3s/k3s.yaml"

// DefaultCheckInterval is the --kubeconfigCheckInterval default.
const DefaultCheckInterval = 2 * time.Second

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "NodePort and LoadBalancer services from the Kubernetes API",
		Noun:    "Kubernetes service",
		Enable: &registry.Enable{Flag: "kubernetes", K8sAPI: true,
			Usage: "watch Kubernetes services of type NodePort and LoadBalancer"},
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			var cfg Config
			registry.NonEmptyStringVar(fs, &cfg.Path, "kubeconfig", DefaultKubeconfig, "kubeconfig of the cluster (waited for if it does not exist yet; re-read when it changes)")
			registry.PositiveDurationVar(fs, &cfg.Check, "kubeconfigCheckInterval", DefaultCheckInterval, "how often the kubeconfig is checked for a new cluster")
			return func(env registry.Env) (core.Source, error) {
				c := cfg
				c.ListenAddr = env.Options.K8sServiceListenerAddr
				c.Log = env.Log
				return New(c)
			}
		},
	})
}

// Config configures a Source; a zero field means its default.
type Config struct {
	// Path is the kubeconfig file (--kubeconfig); empty means
	// DefaultKubeconfig, or, when NewClient is set, no file at all (the
	// client needs none: tests with a fake cluster).
	Path string
	// NewClient builds the client from the kubeconfig's content; nil means
	// FromKubeconfig(Path).
	NewClient ClientFactory
	// Check is how often the file is checked for (re)appearing or
	// changing, and the cluster's identity read (--kubeconfigCheckInterval);
	// zero means DefaultCheckInterval, and it must not be negative.
	Check time.Duration
	// Resync is the informer's resync period; zero means none.
	Resync time.Duration
	// ListenAddr is where service ports bind on the host (from
	// --k8sServiceListenerAddr); the zero value means 127.0.0.1.
	ListenAddr netip.Addr
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source watches the services of one cluster at a time.
type Source struct {
	cfg Config
	log *zap.Logger
}

// New checks cfg, fills its defaults and returns a Source.
func New(cfg Config) (*Source, error) {
	if cfg.NewClient == nil {
		if cfg.Path == "" {
			cfg.Path = DefaultKubeconfig
		}
		cfg.NewClient = FromKubeconfig(cfg.Path)
	}
	if cfg.Check == 0 {
		cfg.Check = DefaultCheckInterval
	}
	if cfg.Check < 0 {
		return nil, fmt.Errorf("--kubeconfigCheckInterval must be positive, got %s", cfg.Check)
	}
	if !cfg.ListenAddr.IsValid() {
		cfg.ListenAddr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	return &Source{cfg: cfg, log: cfg.Log.With(zap.String("source", Name))}, nil
}

// Run watches until ctx is done, following the kubeconfig as it appears
// and changes.
func (s *Source) Run(ctx context.Context, out core.Emitter) error {
	var current []byte
	waiting := false
	var stop context.CancelFunc = func() {}
	var done chan struct{}
	defer func() {
		stop()
		if done != nil {
			<-done
		}
	}()
	ticker := time.NewTicker(s.cfg.Check)
	defer ticker.Stop()
	for {
		data, err := s.readKubeconfig()
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if !waiting {
				s.log.Info("waiting for the kubeconfig", zap.String("path", s.cfg.Path))
				waiting = true
			}
		case err != nil:
			s.log.Warn("cannot read the kubeconfig", zap.String("path", s.cfg.Path), zap.Error(err))
		case current == nil || !bytes.Equal(sha(data), sha(current)):
			waiting = false
			cl, err := s.cfg.NewClient(data)
			if err != nil {
				s.log.Error("unusable kubeconfig; waiting for it to change", zap.Error(err))
				current = data
				break
			}
			if current != nil {
				s.log.Info("kubeconfig changed; watching the new cluster")
			}
			current = data
			stop()
			if done != nil {
				<-done
			}
			wctx, cancel := context.WithCancel(ctx)
			stop, done = cancel, make(chan struct{})
			go func(d chan struct{}) {
				defer close(d)
				s.watch(wctx, cl, out)
			}(done)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
	}
}

func sha(b []byte) []byte { h := sha256.Sum256(b); return h[:] }

// readKubeconfig returns the file's content, or a fixed marker when the
// source has no file.
func (s *Source) readKubeconfig() ([]byte, error) {
	if s.cfg.Path == "" {
		return []byte{}, nil
	}
	return os.ReadFile(s.cfg.Path)
}

// watch follows the services of one cluster until ctx is done. When the
// connection to a synced informer breaks (an API server restart, or a
// cluster reset behind the same kubeconfig), the informer is replaced by a
// fresh one, whose full list corrects whatever changed meanwhile; an
// informer resuming its old watch could wait a long time on a reset
// cluster's resource versions.
func (s *Source) watch(ctx context.Context, cl Client, out core.Emitter) {
	for attempt := 0; ; attempt++ {
		synced := s.informer(ctx, cl, out)
		if ctx.Err() != nil {
			return
		}
		if synced {
			attempt = 0
		}
		s.log.Info("lost the Kubernetes API; relisting once it answers")
		if !core.Sleep(ctx, core.Backoff{Initial: 500 * time.Millisecond, Max: 10 * time.Second}.Delay(attempt)) {
			return
		}
	}
}

// informer runs one service informer. It reports the complete set once
// synced; then every add, update and delete goes through, and relists after
// a watch expiry come as updates and deletes of what changed. It returns
// when ctx is done or, once synced, when the watch fails for a reason other
// than expiry; synced tells whether it got that far.
func (s *Source) informer(ctx context.Context, cl Client, out core.Emitter) (synced bool) {
	ictx, cancel := context.WithCancel(ctx)
	var running sync.WaitGroup
	defer func() {
		cancel() // the informer stops on ictx
		running.Wait()
	}()
	informer := cache.NewSharedIndexInformerWithOptions(cl.Services(), &Service{}, cache.SharedIndexInformerOptions{ResyncPeriod: s.cfg.Resync})
	if err := informer.SetTransform(trim); err != nil {
		s.log.Error("cannot watch services", zap.Error(err))
		return false
	}
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.report(out, obj) },
		UpdateFunc: func(_, obj any) { s.report(out, obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if svc, ok := obj.(*Service); ok {
				out.Delete(string(svc.UID))
			}
		},
	})
	if err != nil {
		s.log.Error("cannot watch services", zap.Error(err))
		return false
	}
	lost := make(chan struct{}, 1)
	_ = informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
			s.log.Debug("service watch expired; the informer relists", zap.Error(err))
			return
		}
		s.log.Debug("service watch failed", zap.Error(err))
		select {
		case lost <- struct{}{}:
		default:
		}
	})
	// A cluster reset behind the same address shows as a new UID of the
	// "default" namespace, which the old watch would not notice. The UID is
	// read before the list, so that it names the cluster that was listed.
	s.log.Info("connecting to the Kubernetes API")
	identity, err := waitIdentity(ictx, cl)
	if err != nil {
		return false
	}
	running.Go(func() { informer.RunWithContext(ictx) })
	if !cache.WaitForCacheSync(ictx.Done(), informer.HasSynced) {
		return false
	}
	var all []core.Mapping
	var quiet []any // services that expose nothing
	for _, obj := range informer.GetStore().List() {
		if m, ok := s.mapping(obj); ok && len(m.Ports) > 0 {
			all = append(all, m)
		} else if ok {
			quiet = append(quiet, obj)
		}
	}
	out.Snapshot(all)
	for _, obj := range quiet {
		note(out, obj)
	}
	s.log.Info("watching Kubernetes services", zap.Int("exposed", len(all)))
	ticker := time.NewTicker(s.cfg.Check)
	defer ticker.Stop()
	for {
		select {
		case <-lost:
			return true
		case <-ctx.Done():
			return true
		case <-ticker.C:
			if identity == "" {
				continue
			}
			if id, err := clusterIdentity(ictx, cl); err == nil && id != identity {
				s.log.Info("the cluster was reset; relisting")
				return true
			}
		}
	}
}

// waitIdentity reads the cluster identity, retrying until the API answers.
// The request is cheap, so the retries stay at most 2 s apart: a restarted
// API server is relisted soon after it is back. A cluster without a
// "default" namespace (a fake one) has identity "".
func waitIdentity(ctx context.Context, cl Client) (string, error) {
	for attempt := 0; ; attempt++ {
		id, err := clusterIdentity(ctx, cl)
		if err == nil || apierrors.IsNotFound(err) {
			return id, nil
		}
		if !core.Sleep(ctx, core.Backoff{Initial: 200 * time.Millisecond, Max: 2 * time.Second}.Delay(attempt)) {
			return "", ctx.Err()
		}
	}
}

// clusterIdentity asks cl for its identity, for at most 5 s.
func clusterIdentity(ctx context.Context, cl Client) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return cl.Identity(cctx)
}

// Interface guards.
var _ core.Source = (*Source)(nil)
