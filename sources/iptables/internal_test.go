package iptables

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

func TestNextScanStretchesWithScanCost(t *testing.T) {
	tests := []struct {
		interval, took, want time.Duration
	}{
		{3 * time.Second, 20 * time.Millisecond, 3 * time.Second},
		{3 * time.Second, 150 * time.Millisecond, 3 * time.Second},
		{3 * time.Second, 340 * time.Millisecond, 6800 * time.Millisecond},
		{3 * time.Second, 3200 * time.Millisecond, 64 * time.Second},
		{100 * time.Millisecond, 10 * time.Millisecond, 200 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := nextScan(tt.interval, tt.took); got != tt.want {
			t.Errorf("nextScan(%v, %v) = %v, want %v", tt.interval, tt.took, got, tt.want)
		}
	}
}

func TestPacerDoesNotChargeUnnotifiedScans(t *testing.T) {
	// A first or periodic scan that dumps 50k services (10 s) leaves the
	// next change to be scanned after the coalescing delay alone.
	var p pacer
	t0 := time.Unix(0, 0)
	p.scanned(t0, t0.Add(10*time.Second), false)
	if wait, ok := p.changed(t0.Add(10*time.Second + time.Millisecond)); !ok || wait != coalesceDelay {
		t.Errorf("changed = %v, %v; want %v, true", wait, ok, coalesceDelay)
	}
	// A notified scan as costly overdraws the credit: ten times over.
	p.scanned(t0.Add(11*time.Second), t0.Add(21*time.Second), true)
	if wait, ok := p.changed(t0.Add(21 * time.Second)); !ok || wait < 90*time.Second {
		t.Errorf("changed = %v, %v after a 10 s notified scan; want about 100 s", wait, ok)
	}
}

func TestDiffPorts(t *testing.T) {
	port := func(proto core.Protocol, n uint16, ip, kind string) ServicePort {
		p := ServicePort{Protocol: proto, Port: n, Kind: kind}
		if ip != "" {
			p.HostIP = netip.MustParseAddr(ip)
		}
		return p
	}
	before := dedupe([]ServicePort{
		port(core.TCP, 80, "", KindNodePort), port(core.TCP, 443, "", KindExternal),
		port(core.TCP, 8080, "127.0.0.1", KindHostPort), port(core.UDP, 53, "", KindNodePort),
	})
	now := dedupe([]ServicePort{
		port(core.TCP, 80, "", KindExternal), // the same id, another kind: unchanged
		port(core.TCP, 8080, "::1", KindHostPort),
		port(core.UDP, 53, "", KindNodePort), port(core.SCTP, 9, "", KindNodePort),
	})
	added, removed := diffPorts(before, now)
	ids := func(ps []ServicePort) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.ID())
		}
		return out
	}
	if got, want := ids(added), []string{"sctp/9", "tcp/[::1]:8080"}; !slices.Equal(got, want) {
		t.Errorf("added %v, want %v", got, want)
	}
	if got, want := ids(removed), []string{"tcp/443", "tcp/127.0.0.1:8080"}; !slices.Equal(got, want) {
		t.Errorf("removed %v, want %v", got, want)
	}
	if a, r := diffPorts(nil, now); len(a) != len(now) || len(r) != 0 {
		t.Errorf("from nothing: %d added, %d removed", len(a), len(r))
	}
}

// TestListenersFollowChanges opens listeners as ports are added and
// removed one change at a time: a NodePort and a hostPort on the listen
// address share one listener, which stays open while either is reported.
func TestListenersFollowChanges(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	port := uint16(testenv.FreePort(t))
	addr := netip.AddrPortFrom(lo, port).String()
	ls := newListeners(lo, zap.NewNop())
	defer ls.closeAll()
	node := ServicePort{Protocol: core.TCP, Port: port, Kind: KindNodePort}
	host := ServicePort{Protocol: core.TCP, Port: port, HostIP: lo, Kind: KindHostPort}
	listening := func(want bool, when string) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		if got := err == nil; got != want {
			t.Errorf("%s: listening on %s is %v, want %v", when, addr, got, want)
		}
	}
	ls.sync([]ServicePort{node})
	listening(true, "the NodePort reported")
	ls.update([]ServicePort{host}, nil)
	listening(true, "the hostPort added")
	ls.update(nil, []ServicePort{node})
	listening(true, "the NodePort removed, the hostPort still there")
	ls.update(nil, []ServicePort{host})
	listening(false, "both removed")
	ls.update([]ServicePort{node}, nil)
	listening(true, "the NodePort back")
	ls.sync(nil)
	listening(false, "a snapshot without it")
}

// TestNoticeReadsDestroyAsDelete decodes a chain destroy notification as
// the kernel lays it out (nfgenmsg, then the table and chain names) and
// finds it the same as a delete.
func TestNoticeReadsDestroyAsDelete(t *testing.T) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: nftaOwnerTable, Data: []byte("nat\x00")},
		{Type: nftaChainName, Data: []byte("KUBE-NODEPORTS\x00")},
	})
	if err != nil {
		t.Fatal(err)
	}
	const destroyChain = 27 // NFT_MSG_DESTROYCHAIN
	m := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | destroyChain)},
		Data:   append([]byte{unix.NFPROTO_IPV4, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	n, ok := decodeNotice(m)
	if !ok || n.msgType != unix.NFT_MSG_DELCHAIN || n.table != "nat" || n.name != "KUBE-NODEPORTS" {
		t.Fatalf("decodeNotice = %+v, %v", n, ok)
	}
	var tx transaction
	tx.note(m)
	if !tx.relevant || len(tx.ops) != 1 || tx.ops[0].kind != opClear {
		t.Errorf("the destroy noted as %+v", tx)
	}
}
