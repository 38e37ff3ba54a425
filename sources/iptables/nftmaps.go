package iptables

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
)

// nftMap is the elements of one of kube-proxy's verdict maps that go to a
// chain.
type nftMap struct {
	family nftables.TableFamily
	name   string
	elems  []NftElement
}

// readMaps reads kube-proxy's maps.
func (s *Source) readMaps() ([]nftMap, error) {
	conn, done, err := s.nftConn()
	if err != nil {
		return nil, err
	}
	defer done()
	return readNftables(conn)
}

// nftConn opens a netlink connection for one scan, in the namespace.
func (s *Source) nftConn() (*nftables.Conn, func(), error) {
	opts := []nftables.ConnOption{nftables.AsLasting()}
	var f *os.File
	if s.cfg.Netns != "" {
		var err error
		if f, err = os.Open(s.cfg.Netns); err != nil {
			return nil, nil, fmt.Errorf("opening network namespace: %w", err)
		}
		opts = append(opts, nftables.WithNetNSFd(int(f.Fd())))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, nil, err
	}
	return c, func() {
		_ = c.CloseLasting()
		if f != nil {
			f.Close()
		}
	}, nil
}

// kubeProxyMaps are the verdict maps of kube-proxy's nftables mode that the
// source reads.
var kubeProxyMaps = []string{"service-nodeports", "service-ips"}

// readNftables reads the verdict maps of the ip and ip6 kube-proxy tables.
func readNftables(conn *nftables.Conn) ([]nftMap, error) {
	var out []nftMap
	for _, family := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		tables, err := conn.ListTablesOfFamily(family)
		if err != nil {
			return nil, fmt.Errorf("listing nftables tables: %w", err)
		}
		i := slices.IndexFunc(tables, func(t *nftables.Table) bool { return t.Name == "kube-proxy" })
		if i < 0 {
			continue
		}
		for _, name := range kubeProxyMaps {
			set, err := conn.GetSetByName(tables[i], name)
			if err != nil {
				continue // an older or newer layout without this map
			}
			elems, err := conn.GetSetElements(set)
			if err != nil {
				return nil, fmt.Errorf("reading %s: %w", name, err)
			}
			m := nftMap{family: family, name: name}
			for _, e := range elems {
				if chain := verdictChain(e); chain != "" {
					m.elems = append(m.elems, NftElement{Key: e.Key, Chain: chain})
				}
			}
			out = append(out, m)
		}
	}
	return out, nil
}

// Netlink attributes of a verdict (linux/netfilter/nf_tables.h).
const nftaVerdictChain = 2

// verdictChain returns the chain a map element's verdict goes to. The
// nftables package does not decode verdicts of maps with concatenated keys,
// so the raw attributes in Val are read when VerdictData is missing.
func verdictChain(e nftables.SetElement) string {
	if e.VerdictData != nil {
		return e.VerdictData.Chain
	}
	ad, err := netlink.NewAttributeDecoder(e.Val)
	if err != nil {
		return ""
	}
	for ad.Next() {
		if ad.Type() == nftaVerdictChain {
			return strings.TrimRight(ad.String(), "\x00")
		}
	}
	return ""
}
