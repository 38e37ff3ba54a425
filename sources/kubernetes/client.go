package kubernetes

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

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
