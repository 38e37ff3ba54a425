package sockets

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// linkWatch tells when links or addresses of the relays' namespace
// change: a tap that is made again (a restarted gvproxy's) is a new
// device, which the relays bound to its name no longer hear, and an
// address that comes (back) lets relays that could not listen start. It
// reads a route netlink socket subscribed to link and address changes,
// and passes on only those of the entries' interfaces and addresses; it
// costs nothing while nothing changes.
type linkWatch struct {
	f       *os.File
	changed chan struct{}
	done    chan struct{}
}

// watchLinks starts a linkWatch in the relays' namespace, or returns nil
// (with a warning) when it cannot: relays then only start with their
// sockets, as before.
func (r *relays) watchLinks() *linkWatch {
	if r == nil {
		return nil
	}
	var fd int
	var err error
	if doErr := r.ns.do(func() {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
		if err == nil {
			err = unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK,
				Groups: unix.RTMGRP_LINK | unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR})
			if err != nil {
				_ = unix.Close(fd)
			}
		}
	}); doErr != nil {
		err = doErr
	}
	if err != nil {
		r.log.Warn("cannot watch the namespace's links; a relay interface made again is not followed", zap.Error(err))
		return nil
	}
	w := &linkWatch{f: os.NewFile(uintptr(fd), "rtnetlink"), changed: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 64<<10)
		for {
			n, err := w.f.Read(buf)
			switch {
			case errors.Is(err, os.ErrClosed):
				return
			case err != nil:
				// ENOBUFS: changes were lost; look anyway.
			case !concernsEntries(r.entries, buf[:n]):
				continue // another link's (a container's veth, say)
			}
			select {
			case w.changed <- struct{}{}:
			default:
			}
		}
	}()
	return w
}

// C delivers a value after links or addresses changed; nil for a nil
// watch.
func (w *linkWatch) C() <-chan struct{} {
	if w == nil {
		return nil
	}
	return w.changed
}

// close stops the watch and waits for its reader.
func (w *linkWatch) close() {
	if w == nil {
		return
	}
	_ = w.f.Close()
	<-w.done
}

// ifindex returns the index of the entry's interface in the namespace, 0
// when it has none or the interface is missing.
func (r *relays) ifindex(e relayEntry) int {
	if e.iface == "" {
		return 0
	}
	var idx int
	_ = r.ns.do(func() {
		if ifc, err := net.InterfaceByName(e.iface); err == nil {
			idx = ifc.Index
		}
	})
	return idx
}

// refresh follows changes of the namespace's links: the relays of an
// entry whose interface is a new device are opened again on it, and a
// relayed port without a relay on some entry (its address or interface
// was missing) is tried again there.
func (r *relays) refresh() {
	if r == nil {
		return
	}
	for i, e := range r.entries {
		idx := r.ifindex(e)
		moved := e.iface != "" && idx != r.bound[i]
		r.bound[i] = idx
		if moved {
			r.missingLogged[i] = false
		}
		for pk, owners := range r.owners {
			if len(owners) == 0 {
				continue
			}
			k := relayKey{i, pk}
			rl := r.active[k]
			if rl != nil && !moved {
				continue
			}
			if rl != nil {
				r.halt(k, rl)
			}
			p := r.byID[owners[0]]
			r.start(k, owners[0], netip.AddrPortFrom(p.HostIP, p.HostPort))
		}
		if moved {
			r.log.Info("relay interface is a new device; relays opened again on it", zap.String("iface", e.iface), zap.Int("ifindex", idx))
		}
	}
}

// concernsEntries reports whether the route netlink messages in b tell of
// a link named as one of entries' interfaces or of an address one of them
// listens on: the changes a relay may have to follow. Every container's
// start and stop changes links and addresses of the namespace too; those
// cost the reader a parse and nothing more. Messages that do not parse
// count as relevant.
func concernsEntries(entries []relayEntry, b []byte) bool {
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil || len(msgs) == 0 && len(b) > 0 {
		return true
	}
	for i := range msgs {
		m := &msgs[i]
		switch m.Header.Type {
		case unix.RTM_NEWLINK, unix.RTM_DELLINK, unix.RTM_NEWADDR, unix.RTM_DELADDR:
		default:
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(m)
		if err != nil {
			return true
		}
		link := m.Header.Type == unix.RTM_NEWLINK || m.Header.Type == unix.RTM_DELLINK
		for _, a := range attrs {
			for _, e := range entries {
				switch {
				case link && a.Attr.Type == unix.IFLA_IFNAME:
					if e.iface != "" && string(bytes.TrimRight(a.Value, "\x00")) == e.iface {
						return true
					}
				case !link && (a.Attr.Type == unix.IFA_LOCAL || a.Attr.Type == unix.IFA_ADDRESS):
					if ip, ok := netip.AddrFromSlice(a.Value); ok && ip.Unmap() == e.addr.Unmap() {
						return true
					}
				}
			}
		}
	}
	return false
}
