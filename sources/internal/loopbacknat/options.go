package loopbacknat

import (
	"fmt"
	"net/netip"

	"github.com/guestagent/guestagent/registry"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
)

// Defaults of the loopback NAT flags: Rancher Desktop's virtual network.
const (
	DefaultIptables  = "iptables"
	DefaultInterface = "eth0"
	DefaultGuestIP   = "192.168.127.2"
)

// Options are one source's loopback NAT settings as its flags give them
// (see BindFlags); Manager checks them and builds the Manager. The zero
// value keeps no rules.
type Options struct {
	// Enabled turns the rules on. Off by default; the source's
	// --<prefix>LoopbackNAT flag defaults to on.
	Enabled bool
	// Iptables is the iptables command (name on PATH or path); empty for
	// DefaultIptables.
	Iptables string
	// Interface is the guest's interface toward the host
	// (--<prefix>NATInterface); empty for DefaultInterface.
	Interface string
	// GuestIP is the guest's IPv4 address toward the host, as text
	// (--<prefix>NATGuestIP); empty for DefaultGuestIP.
	GuestIP string
}

// BindFlags defines the loopback NAT flags of one source, named with
// prefix (e.g. "docker" gives --dockerLoopbackNAT, --dockerIptables,
// --dockerNATInterface and --dockerNATGuestIP), and binds them into o.
func BindFlags(fs *pflag.FlagSet, prefix string, o *Options) {
	fs.BoolVar(&o.Enabled, prefix+"LoopbackNAT", true, "add NAT rules so forwarded traffic reaches ports published on 127.0.0.1")
	registry.NonEmptyStringVar(fs, &o.Iptables, prefix+"Iptables", DefaultIptables, "iptables command for the loopback NAT rules")
	registry.NonEmptyStringVar(fs, &o.Interface, prefix+"NATInterface", DefaultInterface, "interface toward the host, for the loopback NAT rules")
	registry.NonEmptyStringVar(fs, &o.GuestIP, prefix+"NATGuestIP", DefaultGuestIP, "this guest's address toward the host, for the loopback NAT rules")
}

// Manager checks o and returns the Manager of owner's rules, with chain as
// its Config.Chain, entries (the selected sinks' ways in, beside the
// tunnel's) as its Config.Entries and log as its log, or nil when o turns
// the rules off. owner is also the prefix of the source's flags (see
// BindFlags), which the errors name.
func (o Options) Manager(owner, chain string, entries []registry.Entry, log *zap.Logger) (*Manager, error) {
	if !o.Enabled {
		return nil, nil
	}
	if o.Interface == "" {
		o.Interface = DefaultInterface
	}
	if o.GuestIP == "" {
		o.GuestIP = DefaultGuestIP
	}
	ip, err := netip.ParseAddr(o.GuestIP)
	if err != nil || !ip.Is4() {
		return nil, fmt.Errorf("--%sNATGuestIP %q is not an IPv4 address", owner, o.GuestIP)
	}
	var more []Entry
	for _, e := range entries {
		if e.Addr.Is4() {
			more = append(more, Entry{Interface: e.Interface, Addr: e.Addr})
		}
	}
	m, err := New(Config{Owner: owner, Iptables: o.Iptables, Chain: chain, Interface: o.Interface, GuestIP: ip, Entries: more, Log: log})
	if err != nil {
		return nil, fmt.Errorf("%w (turn the rules off with --%sLoopbackNAT=false)", err, owner)
	}
	return m, nil
}
