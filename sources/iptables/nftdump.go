package iptables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ruleDumper dumps the rules of nftables chains over one netlink socket.
//
// nftables.Conn.GetRules reads a dump with buffers of a page, so the
// kernel answers in page-sized parts, and it walks the chain from its
// first rule again for every part: reading 10,000 rules that way costs
// most of a second. The dumper reads with dumpBuffer instead (the size
// nft and iptables-nft use), and decodes only the expressions the parser
// needs, with the nftables expr package.
type ruleDumper struct {
	c   *netlink.Conn
	buf []byte
}

// dumpBuffer is the receive size of a dump: the kernel fills parts of up
// to 32 KiB when the reader's buffer allows it.
const dumpBuffer = 32 << 10

// dumpTimeout bounds one dump.
const dumpTimeout = 10 * time.Second

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

// rules returns the rules of chain in table, decoded. A table or chain
// that does not exist has none.
func (d *ruleDumper) rules(table *nftables.Table, chain string) ([]rule, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: append([]byte(table.Name), 0)},
		{Type: unix.NFTA_RULE_CHAIN, Data: append([]byte(chain), 0)},
	})
	if err != nil {
		return nil, err
	}
	req, err := d.c.Send(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: netlink.Request | netlink.Dump,
		},
		Data: append([]byte{byte(table.Family), unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return nil, fmt.Errorf("asking for the rules: %w", err)
	}
	if err := d.c.SetReadDeadline(time.Now().Add(dumpTimeout)); err != nil {
		return nil, err
	}
	raw, err := d.c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var out []rule
	for {
		var n int
		var rerr error
		if err := raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), d.buf, 0)
			return rerr != unix.EAGAIN
		}); err != nil {
			return nil, fmt.Errorf("reading the rules: %w", err)
		}
		if rerr != nil {
			return nil, fmt.Errorf("reading the rules: %w", rerr)
		}
		msgs, err := syscall.ParseNetlinkMessage(d.buf[:n])
		if err != nil {
			return nil, fmt.Errorf("reading the rules: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != req.Header.Sequence {
				continue // a late part of an earlier dump
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
						if errno == int32(unix.ENOENT) {
							return out, nil
						}
						return nil, fmt.Errorf("reading the rules: %w", syscall.Errno(errno))
					}
				}
				return out, nil
			case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWRULE:
				exprs, err := ruleExprs(m.Data)
				if err != nil {
					return nil, fmt.Errorf("decoding a rule of %s: %w", chain, err)
				}
				out = append(out, decodeRule(table.Family, chain, exprs))
			}
		}
	}
}

// ruleExprs decodes the expressions of a rule message that decodeRule
// reads, leaving out the others (counters, say).
func ruleExprs(data []byte) ([]expr.Any, error) {
	if len(data) < 4 {
		return nil, errors.New("short message")
	}
	family := data[0]
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	var exprs []expr.Any
	for ad.Next() {
		if ad.Type() != unix.NFTA_RULE_EXPRESSIONS {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != unix.NFTA_LIST_ELEM {
					continue
				}
				list.Nested(func(el *netlink.AttributeDecoder) error {
					var name string
					for el.Next() {
						switch el.Type() {
						case unix.NFTA_EXPR_NAME:
							name = el.String()
						case unix.NFTA_EXPR_DATA:
							e, err := decodeExpr(family, name, el.Bytes())
							if err != nil {
								return fmt.Errorf("%s expression: %w", name, err)
							}
							if e != nil {
								exprs = append(exprs, e)
							}
						}
					}
					return nil
				})
			}
			return nil
		})
	}
	return exprs, ad.Err()
}

// decodeExpr decodes one expression of the kinds decodeRule reads, and
// returns nil for the others.
func decodeExpr(family byte, name string, data []byte) (expr.Any, error) {
	var e expr.Any
	switch name {
	case "meta":
		e = &expr.Meta{}
	case "payload":
		e = &expr.Payload{}
	case "bitwise":
		e = &expr.Bitwise{}
	case "cmp":
		e = &expr.Cmp{}
	case "range":
		e = &expr.Range{}
	case "match":
		e = &expr.Match{}
	case "target":
		e = &expr.Target{}
	case "nat":
		e = &expr.NAT{}
	case "masq":
		e = &expr.Masq{}
	case "redir":
		e = &expr.Redir{}
	case "immediate":
		// A verdict is an immediate writing the verdict register.
		imm := &expr.Immediate{}
		if err := expr.Unmarshal(family, data, imm); err != nil {
			return nil, err
		}
		if imm.Register != unix.NFT_REG_VERDICT || len(imm.Data) != 0 {
			return imm, nil
		}
		e = &expr.Verdict{}
	default:
		return nil, nil
	}
	if err := expr.Unmarshal(family, data, e); err != nil {
		return nil, err
	}
	return e, nil
}
