package iptables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ruleDumper dumps the rules of nftables chains over one netlink socket.
//
// The kernel answers a dump in parts of at most 32 KiB (dumpBuffer; a
// smaller receive buffer makes smaller parts, as nftables.Conn.GetRules
// gets with its page-sized reads), about 47 iptables-nft rules each, and
// for every part it walks the chain again from its first rule to where
// the previous part ended. That walk is the part of a dump that grows
// faster than the chain: the rules after the first few thousand cost
// more each than the ones before. The dumper adds as little as it can on
// top of it: it reads the parts into one buffer, walks the messages and
// their attributes in place and copies only the strings a rule keeps.
type ruleDumper struct {
	c   *netlink.Conn
	buf []byte
}

// dumpBuffer is the receive size of a dump: the kernel fills parts of up
// to 32 KiB when the reader's buffer allows it, and no larger.
const dumpBuffer = 32 << 10

// dumpTimeout bounds one dump.
const dumpTimeout = 10 * time.Second

// dumpAttempts is how many times a chain is dumped when it changes while
// it is read (the kernel marks the parts NLM_F_DUMP_INTR then, and the
// dump may have missed or repeated rules). The last attempt's rules are
// used even if it too was interrupted, but not kept: the change that
// interrupted it is notified, and the scan it brings dumps the chain
// again.
const dumpAttempts = 3

// newRuleDumper opens a netfilter socket in the namespace at netns ("" for
// the current one).
func newRuleDumper(netns string) (*ruleDumper, error) {
	var cfg netlink.Config
	if netns != "" {
		f, err := os.Open(netns)
		if err != nil {
			return nil, fmt.Errorf("opening network namespace: %w", err)
		}
		defer f.Close()
		cfg.NetNS = int(f.Fd())
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &cfg)
	if err != nil {
		return nil, fmt.Errorf("opening a netfilter socket: %w", err)
	}
	return &ruleDumper{c: c, buf: make([]byte, dumpBuffer)}, nil
}

func (d *ruleDumper) Close() error { return d.c.Close() }

// generation returns the ruleset's generation (NFT_MSG_GETGEN): the
// counter that each committed transaction increments.
func (d *ruleDumper) generation() (uint32, error) {
	replies, err := d.c.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN),
			Flags: netlink.Request,
		},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, fmt.Errorf("asking for the generation: %w", err)
	}
	for _, m := range replies {
		if gen, ok := genID(m); ok {
			return gen, nil
		}
	}
	return 0, errors.New("asking for the generation: no answer")
}

// genID reads the generation of an NFT_MSG_NEWGEN message.
func genID(m netlink.Message) (uint32, bool) {
	if uint16(m.Header.Type) != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN || len(m.Data) < sizeofNfgenmsg {
		return 0, false
	}
	a := attrs{b: m.Data[sizeofNfgenmsg:]}
	for typ, v, ok := a.next(); ok; typ, v, ok = a.next() {
		if typ == unix.NFTA_GEN_ID && len(v) == 4 {
			return binary.BigEndian.Uint32(v), true
		}
	}
	return 0, false
}

// handledRules returns the rules of chain in table, decoded, with their
// handles, and whether the dump was consistent (the chain did not change
// while it was read, in the last of dumpAttempts). A table or chain that
// does not exist has none.
func (d *ruleDumper) handledRules(table *nftables.Table, chain string) ([]handledRule, bool, error) {
	var out []handledRule
	for range dumpAttempts {
		var intr bool
		var err error
		if out, intr, err = d.dump(table, chain, out[:0]); err != nil {
			return nil, false, err
		}
		if !intr {
			return out, true, nil
		}
	}
	return out, false, nil
}

// dump dumps chain once, appending its rules to out, and tells whether
// the chain changed while it was read.
func (d *ruleDumper) dump(table *nftables.Table, chain string, out []handledRule) ([]handledRule, bool, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: append([]byte(table.Name), 0)},
		{Type: unix.NFTA_RULE_CHAIN, Data: append([]byte(chain), 0)},
	})
	if err != nil {
		return nil, false, err
	}
	req, err := d.c.Send(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: netlink.Request | netlink.Dump,
		},
		Data: append([]byte{byte(table.Family), unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return nil, false, fmt.Errorf("asking for the rules: %w", err)
	}
	if err := d.c.SetReadDeadline(time.Now().Add(dumpTimeout)); err != nil {
		return nil, false, err
	}
	raw, err := d.c.SyscallConn()
	if err != nil {
		return nil, false, err
	}
	intr := false
	for {
		var n int
		var rerr error
		if err := raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), d.buf, 0)
			return rerr != unix.EAGAIN
		}); err != nil {
			return nil, false, fmt.Errorf("reading the rules: %w", err)
		}
		if rerr != nil {
			return nil, false, fmt.Errorf("reading the rules: %w", rerr)
		}
		for b := d.buf[:n]; len(b) > 0; {
			if len(b) < unix.NLMSG_HDRLEN {
				return nil, false, errors.New("reading the rules: truncated message")
			}
			size := int(binary.NativeEndian.Uint32(b))
			if size < unix.NLMSG_HDRLEN || size > len(b) {
				return nil, false, errors.New("reading the rules: malformed message")
			}
			typ := binary.NativeEndian.Uint16(b[4:])
			flags := binary.NativeEndian.Uint16(b[6:])
			seq := binary.NativeEndian.Uint32(b[8:])
			data := b[unix.NLMSG_HDRLEN:size]
			b = b[min((size+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1), len(b)):]
			if seq != req.Header.Sequence {
				continue // a late part of an earlier dump
			}
			if flags&unix.NLM_F_DUMP_INTR != 0 {
				intr = true
			}
			switch typ {
			case unix.NLMSG_DONE:
				return out, intr, nil
			case unix.NLMSG_ERROR:
				if len(data) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(data)); errno != 0 {
						if errno == int32(unix.ENOENT) {
							return out, false, nil
						}
						return nil, false, fmt.Errorf("reading the rules: %w", syscall.Errno(errno))
					}
				}
				return out, intr, nil
			case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWRULE:
				r, handle, err := decodeRule(table.Family, chain, data)
				if err != nil {
					return nil, false, fmt.Errorf("decoding a rule of %s: %w", chain, err)
				}
				out = append(out, handledRule{handle, r})
			}
		}
	}
}
