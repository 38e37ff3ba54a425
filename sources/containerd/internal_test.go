package containerd

import (
	"testing"

	cniutils "github.com/containernetworking/plugins/pkg/utils"
)

// TestPortmapChainIsThePluginsName pins portmapChain to the name the CNI
// plugins' own code gives the portmap plugin's per-container chain.
func TestPortmapChainIsThePluginsName(t *testing.T) {
	for _, tt := range [][2]string{
		{"bridge", "default-0123456789abcdef"},
		{"k8s-pod-network", "k8s.io-3f1c2e"},
		{"", ""},
		{"a-very-long-network-name-that-goes-on", "some-namespace-with-a-long-container-id-too"},
	} {
		want := cniutils.MustFormatChainNameWithPrefix(tt[0], tt[1], "DN-")
		if got := portmapChain(tt[0], tt[1]); got != want {
			t.Errorf("portmapChain(%q, %q) = %q, want %q", tt[0], tt[1], got, want)
		}
	}
}
