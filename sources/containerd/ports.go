package containerd

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/guestagent/guestagent/core"
)

// Labels nerdctl puts on the containers it creates.
const (
	LabelPorts    = "nerdctl/ports"
	LabelStateDir = "nerdctl/state-dir"
	LabelNetworks = "nerdctl/networks"
)

// LabelCRIKind is the label containerd's CRI plugin sets on every
// container it makes ("container" or "sandbox"), last, over the image's
// and the pod's labels; images cannot set it (CRI drops their
// io.cri-containerd.* labels).
const LabelCRIKind = "io.cri-containerd.kind"

// maxPortData bounds a port label or network-config.json.
const maxPortData = 1 << 20

// PortEntry is one port mapping as nerdctl writes it.
type PortEntry struct {
	HostPort      int    `json:"HostPort"`
	ContainerPort int    `json:"ContainerPort"`
	Protocol      string `json:"Protocol"`
	HostIP        string `json:"HostIP"`
}

// networkConfig is nerdctl ≥ 2.2's <state-dir>/network-config.json.
type networkConfig struct {
	PortMappings []PortEntry `json:"portMappings"`
}

// ParseEntries decodes a JSON list of port entries, as in the nerdctl/ports
// label. Malformed JSON is an error; entries that do not make a valid port
// are left out and reported in skipped.
func ParseEntries(data []byte) (ports []core.Port, skipped []error, err error) {
	if len(data) > maxPortData {
		return nil, nil, fmt.Errorf("port data is %d bytes, more than %d", len(data), maxPortData)
	}
	var entries []PortEntry
	if err := json.Unmarshal(data, &entries); err != nil {
		return nil, nil, fmt.Errorf("port data is not a JSON list of port mappings: %w", err)
	}
	ports, skipped = convertEntries(entries)
	return ports, skipped, nil
}

// ParseNetworkConfig decodes nerdctl's network-config.json.
func ParseNetworkConfig(data []byte) (ports []core.Port, skipped []error, err error) {
	if len(data) > maxPortData {
		return nil, nil, fmt.Errorf("network config is %d bytes, more than %d", len(data), maxPortData)
	}
	var cfg networkConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, nil, fmt.Errorf("network config is not valid JSON: %w", err)
	}
	ports, skipped = convertEntries(cfg.PortMappings)
	return ports, skipped, nil
}

func convertEntries(entries []PortEntry) ([]core.Port, []error) {
	var ports []core.Port
	var skipped []error
	for i, e := range entries {
		p, err := e.port()
		if err != nil {
			skipped = append(skipped, fmt.Errorf("port mapping %d (%+v): %w", i, e, err))
			continue
		}
		ports = append(ports, p)
	}
	return ports, skipped
}

func (e PortEntry) port() (core.Port, error) {
	proto, err := core.ParseProtocol(e.Protocol)
	if err != nil {
		return core.Port{}, err
	}
	if e.HostPort < 1 || e.HostPort > 65535 || e.ContainerPort < 1 || e.ContainerPort > 65535 {
		return core.Port{}, errors.New("ports must be 1-65535")
	}
	var ip netip.Addr
	if h := strings.TrimSpace(e.HostIP); h != "" {
		if ip, err = netip.ParseAddr(h); err != nil {
			return core.Port{}, fmt.Errorf("host IP: %w", err)
		}
	}
	return core.Port{Protocol: proto, ContainerPort: uint16(e.ContainerPort), HostIP: ip, HostPort: uint16(e.HostPort)}, nil
}

// NerdctlPorts returns a container's ports from what nerdctl recorded:
// network-config.json in its nerdctl/state-dir (nerdctl ≥ 2.2) if there is
// one, else the nerdctl/ports label. A container with neither has no
// ports. dataRoot is nerdctl's data root, absolute and clean; a state
// directory that is not under it, or that the file cannot be read from
// safely (see readStateFile), is refused, and the label is not used then.
//
// A container made by containerd's CRI plugin (marked by LabelCRIKind)
// never has its nerdctl labels honoured: CRI copies an image's LABELs into
// its containers' labels, so they are the image's word, not nerdctl's. A
// CRI container with nerdctl's port labels is refused; one without them
// has no ports, as every CRI container.
//
// Refusals wrap ErrRefused; port data that does not parse is another
// error.
func NerdctlPorts(dataRoot string, labels map[string]string) (ports []core.Port, skipped []error, err error) {
	return nerdctlPorts(dataRoot, labels, openBeneath)
}

func nerdctlPorts(dataRoot string, labels map[string]string, open dirOpener) ([]core.Port, []error, error) {
	// Empty labels are as good as none, as nerdctl sees them.
	dir := labels[LabelStateDir]
	label := labels[LabelPorts]
	hasDir, hasLabel := dir != "", strings.TrimSpace(label) != ""
	if kind, ok := labels[LabelCRIKind]; ok {
		if hasDir || hasLabel {
			return nil, nil, refused("the container was made by containerd's CRI plugin (%s=%q), which copies image labels", LabelCRIKind, kind)
		}
		return nil, nil, nil
	}
	if hasDir {
		if err := checkDataRoot(dataRoot); err != nil {
			return nil, nil, refused("nerdctl's data root: %w", err)
		}
		data, err := readStateFile(dataRoot, dir, open)
		switch {
		case err == nil:
			return ParseNetworkConfig(data)
		case err != errNoNetworkConfig:
			return nil, nil, err
		}
	}
	if hasLabel {
		return ParseEntries([]byte(label))
	}
	return nil, nil, nil
}

// Networks returns the networks in the nerdctl/networks label.
func Networks(labels map[string]string) ([]string, error) {
	raw, ok := labels[LabelNetworks]
	if !ok || raw == "" {
		return nil, nil
	}
	var nets []string
	if err := json.Unmarshal([]byte(raw), &nets); err != nil {
		return nil, fmt.Errorf("label %s is not a JSON list of names: %w", LabelNetworks, err)
	}
	return nets, nil
}
