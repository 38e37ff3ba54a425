package kubernetes

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
)

// Service types the source tells apart (the API's spec.type values).
const (
	TypeClusterIP    = "ClusterIP"
	TypeNodePort     = "NodePort"
	TypeLoadBalancer = "LoadBalancer"
	TypeExternalName = "ExternalName"
)

// Service is the part of a core/v1 Service that the source reads: its
// metadata, type and ports. The API server's JSON is decoded into it, so
// the rest of the object (status, selectors, IP families...) is never
// kept, and trim drops what the metadata holds beyond the object's
// identity before the informer caches it.
type Service struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ServiceSpec `json:"spec,omitempty"`
}

// ServiceSpec is the part of a service's spec the source reads.
type ServiceSpec struct {
	// Type is ClusterIP (also when empty), NodePort, LoadBalancer or
	// ExternalName.
	Type  string        `json:"type,omitempty"`
	Ports []ServicePort `json:"ports,omitempty"`
}

// ServicePort is one port of a service.
type ServicePort struct {
	Name     string `json:"name,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Port     int32  `json:"port"`
	NodePort int32  `json:"nodePort,omitempty"`
}

// DeepCopyObject implements runtime.Object.
func (s *Service) DeepCopyObject() runtime.Object {
	if s == nil {
		return nil
	}
	c := &Service{TypeMeta: s.TypeMeta, Spec: ServiceSpec{Type: s.Spec.Type}}
	s.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Spec.Ports = append([]ServicePort(nil), s.Spec.Ports...)
	return c
}

// ServiceList is a page of services, as the API server lists them.
type ServiceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Service `json:"items"`
}

// DeepCopyObject implements runtime.Object.
func (l *ServiceList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	c := &ServiceList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&c.ListMeta)
	if l.Items != nil {
		c.Items = make([]Service, len(l.Items))
		for i := range l.Items {
			c.Items[i] = *l.Items[i].DeepCopyObject().(*Service)
		}
	}
	return c
}

// namespace is a core/v1 Namespace's metadata: the cluster identity is the
// "default" namespace's UID.
type namespace struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
}

func (n *namespace) DeepCopyObject() runtime.Object {
	if n == nil {
		return nil
	}
	c := &namespace{TypeMeta: n.TypeMeta}
	n.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	return c
}

// coreV1 is the core API group's version.
var coreV1 = schema.GroupVersion{Version: "v1"}

// codecs decode the three kinds above, and the API's own (Status,
// WatchEvent, the list options), from the core group.
var codecs = func() serializer.CodecFactory {
	scheme := runtime.NewScheme()
	scheme.AddKnownTypeWithName(coreV1.WithKind("Service"), &Service{})
	scheme.AddKnownTypeWithName(coreV1.WithKind("ServiceList"), &ServiceList{})
	scheme.AddKnownTypeWithName(coreV1.WithKind("Namespace"), &namespace{})
	metav1.AddToGroupVersion(scheme, coreV1)
	return serializer.NewCodecFactory(scheme)
}()

// trim is the informer's transform: it keeps of a service's metadata only
// what names it (namespace, name, UID, resource version), so that labels,
// annotations (kubectl's last-applied copy of the object) and managed
// fields are not cached.
func trim(obj any) (any, error) {
	svc, ok := obj.(*Service)
	if !ok {
		return obj, nil
	}
	svc.ObjectMeta = metav1.ObjectMeta{
		Namespace:       svc.Namespace,
		Name:            svc.Name,
		UID:             svc.UID,
		ResourceVersion: svc.ResourceVersion,
	}
	return svc, nil
}
