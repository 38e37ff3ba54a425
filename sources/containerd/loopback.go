package containerd

import (
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/sources/internal/loopbacknat"
)

var localhost = netip.AddrFrom4([4]byte{127, 0, 0, 1})

// loopback returns the NAT bindings for ports on 127.0.0.1: one per CNI
// network of the container, in the chain the portmap plugin made for it.
func (s *Source) loopback(ns, id string, labels map[string]string, pid uint32, ports []core.Port) []loopbacknat.Binding {
	var want []core.Port
	for _, p := range ports {
		if p.HostIP == localhost {
			want = append(want, p)
		}
	}
	if len(want) == 0 {
		return nil
	}
	nets, err := Networks(labels)
	if err == nil && len(nets) == 0 {
		err = errors.New("no networks in its labels")
	}
	var ip netip.Addr
	if err == nil {
		ip, err = TaskIPv4(pid, "eth0")
	}
	if err != nil {
		s.log.Warn("no loopback NAT rules for container", zap.String("container", ID(ns, id)), zap.Error(err))
		return nil
	}
	var out []loopbacknat.Binding
	for _, n := range nets {
		chain := portmapChain(n, ns+"-"+id)
		for _, p := range want {
			out = append(out, loopbacknat.Binding{Protocol: p.Protocol, HostPort: p.HostPort,
				Backend: netip.AddrPortFrom(ip, p.ContainerPort), Chain: chain})
		}
	}
	return out
}

// portmapChain is the name of the DNAT chain that the CNI portmap plugin
// makes for one container on one network: "CNI-DN-" and the hex SHA-512
// of the network name followed by the container id, cut to iptables' 28
// characters.
func portmapChain(network, id string) string {
	sum := sha512.Sum512([]byte(network + id))
	const prefix = "CNI-DN-"
	return (prefix + hex.EncodeToString(sum[:]))[:28]
}

// TaskIPv4 returns the first IPv4 address of interface iface inside the
// network namespace of process pid.
func TaskIPv4(pid uint32, iface string) (netip.Addr, error) {
	if pid == 0 {
		return netip.Addr{}, errors.New("task has no pid")
	}
	target, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return netip.Addr{}, err
	}
	defer target.Close()

	type result struct {
		ip  netip.Addr
		err error
	}
	done := make(chan result, 1)
	// The namespace switch happens on a thread of its own, which is thrown
	// away if it cannot be switched back.
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: err}
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("entering the task's network namespace: %w", err)}
			return
		}
		ip, err := firstIPv4(iface)
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{ip, err}
	}()
	r := <-done
	return r.ip, r.err
}

func firstIPv4(name string) (netip.Addr, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().Is4() {
				return ip.Unmap(), nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("%s has no IPv4 address", name)
}
