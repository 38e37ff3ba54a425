package containerd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	namespacesapi "github.com/containerd/containerd/api/services/namespaces/v1"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/dialer"
	cerrdefs "github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// The source speaks to containerd through the generated gRPC clients of its
// API services (github.com/containerd/containerd/api) rather than
// containerd's Go client, which would link its content, image, snapshot and
// transfer machinery into the agent. gRPC errors are turned into errdefs
// errors (errgrpc.ToNative), as that client does, so that cerrdefs.IsNotFound
// applies to them.

// engine is one connection to containerd and its API services' clients.
type engine struct {
	conn       *grpc.ClientConn
	health     healthpb.HealthClient
	events     eventsapi.EventsClient
	namespaces namespacesapi.NamespacesClient
	containers containersapi.ContainersClient
	tasks      tasksapi.TasksClient
}

// dial connects to containerd's socket as its own client does: gRPC over
// the unix socket, reconnecting with a backoff capped at timeout, and
// messages of up to 16 MiB.
func dial(socket string, timeout time.Duration) (*engine, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = timeout
	conn, err := grpc.NewClient(dialer.DialAddress(socket),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig, MinConnectTimeout: timeout}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)))
	if err != nil {
		return nil, fmt.Errorf("failed to dial %q: %w", socket, err)
	}
	return &engine{
		conn:       conn,
		health:     healthpb.NewHealthClient(conn),
		events:     eventsapi.NewEventsClient(conn),
		namespaces: namespacesapi.NewNamespacesClient(conn),
		containers: containersapi.NewContainersClient(conn),
		tasks:      tasksapi.NewTasksClient(conn),
	}, nil
}

// serving tells whether containerd answers its health check, waiting for
// the connection until ctx is done.
func (e *engine) serving(ctx context.Context) (bool, error) {
	r, err := e.health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	return r.Status == healthpb.HealthCheckResponse_SERVING, nil
}

// listNamespaces returns the names of containerd's namespaces.
func (e *engine) listNamespaces(ctx context.Context) ([]string, error) {
	resp, err := e.namespaces.List(ctx, &namespacesapi.ListNamespacesRequest{})
	if err != nil {
		return nil, errgrpc.ToNative(err)
	}
	names := make([]string, 0, len(resp.Namespaces))
	for _, ns := range resp.Namespaces {
		names = append(names, ns.Name)
	}
	return names, nil
}

// listContainers returns the containers of ctx's namespace, streamed, or
// in one reply from a containerd that cannot stream them.
func (e *engine) listContainers(ctx context.Context) ([]*containersapi.Container, error) {
	stream, err := e.containers.ListStream(ctx, &containersapi.ListContainersRequest{})
	if err != nil {
		return nil, errgrpc.ToNative(err)
	}
	var ctrs []*containersapi.Container
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return ctrs, nil
		}
		if status.Code(err) == codes.Unimplemented {
			resp, err := e.containers.List(ctx, &containersapi.ListContainersRequest{})
			if err != nil {
				return nil, errgrpc.ToNative(err)
			}
			return resp.Containers, nil
		}
		if err != nil {
			return nil, errgrpc.ToNative(err)
		}
		if msg.Container != nil {
			ctrs = append(ctrs, msg.Container)
		}
	}
}

// container returns container id of ctx's namespace.
func (e *engine) container(ctx context.Context, id string) (*containersapi.Container, error) {
	resp, err := e.containers.Get(ctx, &containersapi.GetContainerRequest{ID: id})
	if err != nil {
		return nil, errgrpc.ToNative(err)
	}
	if resp.Container == nil {
		return nil, fmt.Errorf("containerd returned no container for %s", id)
	}
	return resp.Container, nil
}

// task returns the process of container id's task in ctx's namespace; an
// error matching errdefs.ErrNotFound if it has none.
func (e *engine) task(ctx context.Context, id string) (*tasktypes.Process, error) {
	resp, err := e.tasks.Get(ctx, &tasksapi.GetRequest{ContainerID: id})
	if err != nil {
		err = errgrpc.ToNative(err)
		if cerrdefs.IsNotFound(err) {
			return nil, fmt.Errorf("no running task found: %w", err)
		}
		return nil, err
	}
	if resp.Process == nil {
		return nil, fmt.Errorf("task of %s has no process", id)
	}
	return resp.Process, nil
}
