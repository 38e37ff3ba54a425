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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
)

// Name is the source's registry name.
const Name = "kubernetes"

// DefaultKubeconfig is where k3s writes its kubeconfig.
const DefaultKubeconfig = "/etc/rancher/k3s/k3s.yaml"

func init() {
	registry.RegisterSource(registry.SourcePlugin{
		Name:    Name,
		Summary: "NodePort and LoadBalancer services from the Kubernetes API",
		Setup: func(fs *pflag.FlagSet) registry.SourceFactory {
			path := fs.String("kubeconfig", DefaultKubeconfig, "kubeconfig of the cluster (waited for if it does not exist yet; re-read when it changes)")
			check := fs.Duration("kubeconfigCheckInterval", 2*time.Second, "how often the kubeconfig is checked for a new cluster")
			return func(env registry.Env) (core.Source, error) {
				if *path == "" {
					return nil, errors.New("--kubeconfig is empty")
				}
				if *check <= 0 {
					return nil, fmt.Errorf("--kubeconfigCheckInterval must be positive, got %s", *check)
				}
				return New(Config{
					NewClient:  FromKubeconfig(*path),
					Path:       *path,
					Check:      *check,
					ListenAddr: env.Options.K8sServiceListenerAddr,
					Log:        env.Log,
				}), nil
			}
		},
	})
}

// Client is what the source asks of one cluster.
type Client interface {
	// Services lists and watches the services of every namespace, as
	// *Service objects.
	Services() cache.ListerWatcher
	// Identity returns the UID of the "default" namespace, which every API
	// server creates and which changes when the cluster is recreated; an
	// error that apierrors.IsNotFound accepts when there is none.
	Identity(ctx context.Context) (string, error)
}

// ClientFactory builds a Client from a kubeconfig's content.
type ClientFactory func(kubeconfig []byte) (Client, error)

// FromKubeconfig returns the factory that reads the kubeconfig at path. Its
// client speaks JSON to the core API group and decodes only the fields the
// source reads (see Service), so no generated clientset, API type or
// scheme of client-go is linked into the agent.
func FromKubeconfig(path string) ClientFactory {
	return func(data []byte) (Client, error) {
		cfg, err := clientcmd.RESTConfigFromKubeConfig(data)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
		cfg.Timeout = 30 * time.Second
		c, err := newRESTClient(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
		return c, nil
	}
}

// restClient is the Client of a real API server.
type restClient struct{ rc *rest.RESTClient }

func newRESTClient(cfg *rest.Config) (*restClient, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &coreV1
	cfg.ContentType = "application/json"
	cfg.AcceptContentTypes = "application/json"
	cfg.NegotiatedSerializer = codecs.WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = "guestagent"
	}
	rc, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, err
	}
	return &restClient{rc}, nil
}

func (c *restClient) Services() cache.ListerWatcher {
	return cache.NewListWatchFromClient(c.rc, "services", metav1.NamespaceAll, fields.Everything())
}

func (c *restClient) Identity(ctx context.Context) (string, error) {
	var ns namespace
	if err := c.rc.Get().Resource("namespaces").Name(metav1.NamespaceDefault).Do(ctx).Into(&ns); err != nil {
		return "", err
	}
	return string(ns.UID), nil
}

// Config configures a Source.
type Config struct {
	// NewClient builds the client from the kubeconfig's content.
	NewClient ClientFactory
	// Path is the kubeconfig file; empty means NewClient needs no file
	// (tests with a fake cluster).
	Path string
	// Check is how often the file is checked for (re)appearing or changing.
	Check time.Duration
	// Resync is the informer's resync period (0: none).
	Resync time.Duration
	// ListenAddr is where service ports bind on the host.
	ListenAddr netip.Addr
	// Log receives the source's log lines; nil discards them.
	Log *zap.Logger
}

// Source watches the services of one cluster at a time.
type Source struct {
	cfg Config
	log *zap.Logger
}

// New returns a Source.
func New(cfg Config) *Source {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Check <= 0 {
		cfg.Check = 2 * time.Second
	}
	if !cfg.ListenAddr.IsValid() {
		cfg.ListenAddr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return &Source{cfg: cfg, log: cfg.Log.With(zap.String("source", Name))}
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

func (s *Source) report(out core.Emitter, obj any) {
	m, ok := s.mapping(obj)
	if !ok {
		return
	}
	out.Set(m) // a service with no exposed ports (ClusterIP) is a removal
	if len(m.Ports) == 0 {
		note(out, obj)
	}
}

// note tells the router of a service that exposes nothing (a ClusterIP
// service, say), so that explaining one of its ports can name it.
func note(out core.Emitter, obj any) {
	n, ok := out.(core.Noter)
	svc, isService := obj.(*Service)
	if !ok || !isService || svc.UID == "" {
		return
	}
	var ports []core.Port
	for _, p := range svc.Spec.Ports {
		proto, err := core.ParseProtocol(string(p.Protocol))
		if err != nil || p.Port < 1 || p.Port > 65535 {
			continue
		}
		ports = append(ports, core.Port{Protocol: proto, ContainerPort: uint16(p.Port)})
	}
	typ := svc.Spec.Type
	if typ == "" {
		typ = TypeClusterIP
	}
	n.Note(core.Note{
		Key:    core.Key{ID: string(svc.UID)},
		What:   fmt.Sprintf("Kubernetes service %s/%s", svc.Namespace, svc.Name),
		Ports:  ports,
		Reason: fmt.Sprintf("it is of type %s; only NodePort and LoadBalancer services are exposed on the host", typ),
	})
}

// mapping converts a service: a NodePort service's node ports, or a
// LoadBalancer service's ports.
func (s *Source) mapping(obj any) (core.Mapping, bool) {
	svc, ok := obj.(*Service)
	if !ok || svc.UID == "" {
		return core.Mapping{}, false
	}
	m, skipped := Convert(svc, s.cfg.ListenAddr)
	for _, err := range skipped {
		s.log.Warn("service port skipped", zap.String("service", svc.Namespace+"/"+svc.Name), zap.Error(err))
	}
	return m, true
}

// Convert returns the mapping of svc, whose id is the service UID, and
// why each port of a NodePort or LoadBalancer service that it leaves out
// (a port out of range, an unknown protocol) was left out.
func Convert(svc *Service, listen netip.Addr) (core.Mapping, []error) {
	m := core.Mapping{Key: core.Key{Source: Name, ID: string(svc.UID)}}
	var skipped []error
	for _, p := range svc.Spec.Ports {
		var port int32
		switch svc.Spec.Type {
		case TypeNodePort:
			port = p.NodePort
		case TypeLoadBalancer:
			port = p.Port
		default:
			continue
		}
		if port < 1 || port > 65535 {
			skipped = append(skipped, fmt.Errorf("port %q: host port %d is out of range", p.Name, port))
			continue
		}
		proto, err := core.ParseProtocol(string(p.Protocol))
		if err != nil {
			skipped = append(skipped, fmt.Errorf("port %q: %w", p.Name, err))
			continue
		}
		m.Ports = append(m.Ports, core.Port{Protocol: proto, ContainerPort: uint16(port), HostIP: listen, HostPort: uint16(port)})
	}
	return m.Normalize(), skipped
}
