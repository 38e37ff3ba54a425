package kubernetes

import (
	"fmt"
	"net/netip"

	"go.uber.org/zap"

	"github.com/guestagent/guestagent/core"
)

// report sends a service's mapping as an add or update, and notes a
// service that exposes nothing.
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
