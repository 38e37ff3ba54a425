package containerd

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/guestagent/guestagent/core"
)

// Labels nerdctl puts on the containers it creates.
const (
	LabelPorts    = "nerdctl/ports"
	LabelStateDir = "nerdctl/state-dir"
	LabelNetworks = "nerdctl/networks"
)

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

// PortsFromLabels returns a container's ports: from network-config.json in
// its nerdctl state directory (nerdctl ≥ 2.2) if there is one, else from the
// nerdctl/ports label. A container with neither has no ports.
func PortsFromLabels(labels map[string]string) (ports []core.Port, skipped []error, err error) {
	if dir := labels[LabelStateDir]; dir != "" {
		data, err := readLimited(filepath.Join(dir, "network-config.json"))
		switch {
		case err == nil:
			return ParseNetworkConfig(data)
		case !errors.Is(err, os.ErrNotExist):
			return nil, nil, err
		}
	}
	if label, ok := labels[LabelPorts]; ok && strings.TrimSpace(label) != "" {
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

func readLimited(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Size() > maxPortData {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", path, fi.Size(), maxPortData)
	}
	return os.ReadFile(path)
}
