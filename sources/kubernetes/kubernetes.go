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
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	k8s "k8s.io/client-go/kubernetes"
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
	registry.RegisterSource(registry.Source{
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

// ClientFactory builds a clientset from a kubeconfig's content.
type ClientFactory func(kubeconfig []byte) (k8s.Interface, error)

// FromKubeconfig returns the factory that reads the kubeconfig at path.
func FromKubeconfig(path string) ClientFactory {
	return func(data []byte) (k8s.Interface, error) {
		cfg, err := clientcmd.RESTConfigFromKubeConfig(data)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
		cfg.Timeout = 30 * time.Second
		cs, err := k8s.NewForConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
		}
		return cs, nil
	}
}

// Config configures a Source.
type Config struct {
	// NewClient builds the clientset from the kubeconfig's content.
	NewClient ClientFactory
	// Path is the kubeconfig file; empty means NewClient needs no file
	// (tests with a fake clientset).
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
			cs, err := s.cfg.NewClient(data)
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
				s.watch(wctx, cs, out)
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
func (s *Source) watch(ctx context.Context, cs k8s.Interface, out core.Emitter) {
	for attempt := 0; ; attempt++ {
		synced := s.informer(ctx, cs, out)
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
func (s *Source) informer(ctx context.Context, cs k8s.Interface, out core.Emitter) (synced bool) {
	ictx, cancel := context.WithCancel(ctx)
	factory := informers.NewSharedInformerFactory(cs, s.cfg.Resync)
	defer func() {
		cancel() // Shutdown waits for the informers, which stop on ictx
		factory.Shutdown()
	}()
	informer := factory.Core().V1().Services().Informer()
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.report(out, obj) },
		UpdateFunc: func(_, obj any) { s.report(out, obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if svc, ok := obj.(*corev1.Service); ok {
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
	identity, err := waitIdentity(ictx, cs)
	if err != nil {
		return false
	}
	factory.Start(ictx.Done())
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
			if id, err := clusterIdentity(ictx, cs); err == nil && id != identity {
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
func waitIdentity(ctx context.Context, cs k8s.Interface) (string, error) {
	for attempt := 0; ; attempt++ {
		id, err := clusterIdentity(ctx, cs)
		if err == nil || apierrors.IsNotFound(err) {
			return id, nil
		}
		if !core.Sleep(ctx, core.Backoff{Initial: 200 * time.Millisecond, Max: 2 * time.Second}.Delay(attempt)) {
			return "", ctx.Err()
		}
	}
}

// clusterIdentity returns the UID of the "default" namespace, which every
// API server creates and which changes when the cluster is recreated.
func clusterIdentity(ctx context.Context, cs k8s.Interface) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ns, err := cs.CoreV1().Namespaces().Get(cctx, metav1.NamespaceDefault, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	return string(ns.UID), nil
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
	svc, isService := obj.(*corev1.Service)
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
		typ = corev1.ServiceTypeClusterIP
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
	svc, ok := obj.(*corev1.Service)
	if !ok || svc.UID == "" {
		return core.Mapping{}, false
	}
	return Convert(svc, s.cfg.ListenAddr), true
}

// Convert returns the mapping of svc: its id is the service UID.
func Convert(svc *corev1.Service, listen netip.Addr) core.Mapping {
	m := core.Mapping{Key: core.Key{Source: Name, ID: string(svc.UID)}}
	for _, p := range svc.Spec.Ports {
		var port int32
		switch svc.Spec.Type {
		case corev1.ServiceTypeNodePort:
			port = p.NodePort
		case corev1.ServiceTypeLoadBalancer:
			port = p.Port
		default:
			continue
		}
		if port < 1 || port > 65535 {
			continue
		}
		proto, err := core.ParseProtocol(string(p.Protocol))
		if err != nil {
			continue
		}
		m.Ports = append(m.Ports, core.Port{Protocol: proto, ContainerPort: uint16(port), HostIP: listen, HostPort: uint16(port)})
	}
	return m.Normalize()
}
