package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
	"github.com/guestagent/guestagent/sources/kubernetes/apiservertest"
)

// TestOverlappingClaimsInTheRealConfiguration runs the agent as the
// desktop app does with Kubernetes on: network-tunnel mode, the kubernetes
// and iptables sources, host-switch (a real gvproxy holding static forwards
// of its own) and wsl-proxy (a peer that, like the real one, keys
// listeners by port). Every NodePort is claimed twice, by the service and
// by kube-proxy's rule; two LoadBalancer services share a port; a NodePort
// service becomes a LoadBalancer. No port another claim still wants is ever
// closed on either peer, and gvproxy's own forwards are never touched.
func TestOverlappingClaimsInTheRealConfiguration(t *testing.T) {
	testenv.Integration(t)
	if testing.Short() {
		t.Skip("starts kube-apiserver")
	}
	dir := t.TempDir()
	kubeDir := filepath.Join(dir, "kube")
	if err := os.MkdirAll(kubeDir, 0o755); err != nil {
		t.Fatal(err)
	}
	kube, err := apiservertest.Start(kubeDir)
	if err != nil {
		testenv.Missing(t, "kube-apiserver ("+err.Error()+")")
	}
	defer kube.Stop()
	apiPort := testenv.FreePort(t)
	gv := gvproxytest.Start(t, map[string]string{fmt.Sprintf("127.0.0.1:%d", apiPort): fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, apiPort)})
	wsl := &wslproxytest.Peer{Path: filepath.Join(dir, "wsl-proxy.sock"), RecordOnly: true}
	if err := wsl.Start(); err != nil {
		t.Fatal(err)
	}
	defer wsl.Stop()
	ns := testenv.Netns(t)
	for _, chain := range []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXT-NP"} {
		testenv.RunIn(t, ns, "iptables", "-t", "nat", "-N", chain)
	}
	nodePort := freePortIn(t, 30000, 32767)
	lbPort, lb2Port := testenv.FreePort(t), testenv.FreePort(t)

	statusAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	args := isolated(t, []string{"--adminInstall", "--sockets=false", "--statusAddr=" + statusAddr, "--kubernetes", "--kubeconfig=" + kube.Kubeconfig,
		"--k8sAPIPort=" + fmt.Sprint(apiPort), "--iptables",
		"--iptablesNetns=/var/run/netns/" + ns,
		"--iptablesListeners=false", "--iptablesScanInterval=200ms",
		"--hostSwitchURL=" + gv.URL(), "--hostSwitchCheckInterval=200ms", "--wslProxySocket=" + wsl.Path})
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() { done <- run(ctx, args, &out, &errOut) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-done
		}
	}()

	services := kube.Client.CoreV1().Services("default")
	create := func(name string, typ corev1.ServiceType, port, nodePort int) {
		t.Helper()
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Type: typ, Ports: []corev1.ServicePort{{
				Name: "http", Protocol: corev1.ProtocolTCP, Port: int32(port), NodePort: int32(nodePort),
			}}},
		}
		if _, err := services.Create(context.Background(), svc, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating service %s: %v", name, err)
		}
	}
	remove := func(name string) {
		t.Helper()
		if err := services.Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatalf("deleting service %s: %v", name, err)
		}
	}
	natRule := []string{"iptables", "-t", "nat", "-A", "KUBE-NODEPORTS", "-p", "tcp", "-m", "comment", "--comment", "default/np:http",
		"-m", "tcp", "--dport", fmt.Sprint(nodePort), "-j", "KUBE-EXT-NP"}
	both := func(ports ...int) {
		t.Helper()
		want := tcpLoopback(ports...)
		testenv.Eventually(t, 30*time.Second, fmt.Sprintf("gvproxy and wsl-proxy holding %q", want), func() (bool, string) {
			api := func(e string) bool { return e == fmt.Sprintf("tcp 127.0.0.1:%d", apiPort) }
			fw := slices.DeleteFunc(ourForwards(t, gv.URL()), api) // gvproxy's own
			w := slices.DeleteFunc(wsl.State(), api)               // the agent's k8s-api mapping
			return slices.Equal(fw, want) && slices.Equal(w, want), fmt.Sprintf("gvproxy %q, wsl-proxy %q", fw, w)
		})
	}

	// A NodePort, seen by the kubernetes source and in kube-proxy's rule.
	create("np", corev1.ServiceTypeNodePort, 80, nodePort)
	testenv.RunIn(t, ns, natRule...)
	both(nodePort)
	waitClaims(t, statusAddr, nodePort, "iptables", "kubernetes")
	// The service goes first; the rule still claims the port.
	remove("np")
	create("lb-a", corev1.ServiceTypeLoadBalancer, lbPort, 0)
	both(nodePort, lbPort)
	// Two LoadBalancer services on one port: one exposure, kept while
	// either remains.
	create("lb-b", corev1.ServiceTypeLoadBalancer, lbPort, 0)
	waitClaims(t, statusAddr, lbPort, "kubernetes", "kubernetes")
	remove("lb-a")
	// A NodePort service that becomes a LoadBalancer.
	create("np2", corev1.ServiceTypeNodePort, lb2Port, 0)
	np2, err := services.Get(context.Background(), "np2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	np2Node := int(np2.Spec.Ports[0].NodePort)
	both(nodePort, lbPort, np2Node)
	np2.Spec.Type = corev1.ServiceTypeLoadBalancer
	if _, err := services.Update(context.Background(), np2, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	both(nodePort, lbPort, lb2Port)
	// kube-proxy's rule goes: the last claim on the NodePort.
	testenv.RunIn(t, ns, append([]string{"iptables", "-t", "nat", "-D"}, natRule[4:]...)...)
	both(lbPort, lb2Port)
	remove("lb-b")
	both(lb2Port)

	// No removal ever reached a peer for a port while another claim held
	// it: the NodePort and the shared LoadBalancer port each saw exactly
	// one removal, at the end.
	for _, p := range []int{nodePort, lbPort} {
		if n := wslRemovals(wsl, p); n != 1 {
			t.Errorf("wsl-proxy got %d removals of port %d, want 1 (when its last claim went)", n, p)
		}
	}
	if err := wsl.Err(); err != nil {
		t.Errorf("wsl-proxy peer: %v", err)
	}
	if n := wsl.Truncated(); n > 0 {
		t.Errorf("wsl-proxy got %d messages cut short", n)
	}
	cancel()
	stopped = true
	if code := <-done; code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	all := forwardsOf(t, gv.URL())
	for local, remote := range gv.Static() {
		if all[local] != remote {
			t.Errorf("gvproxy's own forward %s -> %s is %q after the run", local, remote, all[local])
		}
	}
	if got := ourForwards(t, gv.URL()); len(got) != 1 || got[0] != fmt.Sprintf("tcp 127.0.0.1:%d", apiPort) {
		t.Errorf("after shutdown gvproxy forwards %v to the guest, want only its own API forward", got)
	}
}

// waitClaims waits until the agent's status shows port claimed by the
// given sources (sorted), at both sinks.
func waitClaims(t *testing.T, statusAddr string, port int, sources ...string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, fmt.Sprintf("port %d claimed by %v", port, sources), func() (bool, string) {
		res, err := http.Get("http://" + statusAddr + "/status")
		if err != nil {
			return false, err.Error()
		}
		defer res.Body.Close()
		var st core.Status
		if err := json.NewDecoder(res.Body).Decode(&st); err != nil {
			return false, err.Error()
		}
		for _, ps := range st.Ports {
			if int(ps.HostPort) != port {
				continue
			}
			var got []string
			for _, c := range ps.Claims {
				got = append(got, c.Key.Source)
			}
			slices.Sort(got)
			return slices.Equal(got, sources) && len(ps.Sinks) == 2, fmt.Sprintf("%+v", ps)
		}
		return false, "not in status"
	})
}

func tcpLoopback(ports ...int) []string {
	var out []string
	for _, p := range ports {
		out = append(out, fmt.Sprintf("tcp 127.0.0.1:%d", p))
	}
	slices.Sort(out)
	return out
}

// freePortIn returns a port in [lo, hi] free on 127.0.0.1 a moment ago.
func freePortIn(t *testing.T, lo, hi int) int {
	t.Helper()
	for p := lo + int(time.Now().UnixNano()%int64(hi-lo)); ; p = lo + (p-lo+1)%(hi-lo+1) {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			l.Close()
			return p
		}
	}
}

// wslRemovals counts the removals of host port p the wsl-proxy peer got.
func wslRemovals(wsl *wslproxytest.Peer, p int) int {
	n := 0
	for _, pm := range wsl.Received() {
		if !pm.Remove {
			continue
		}
		b, _ := json.Marshal(pm.Ports)
		if strings.Contains(string(b), fmt.Sprintf(`"HostPort":"%d"`, p)) {
			n++
		}
	}
	return n
}

// forwardsOf returns gvproxy's forwards, local -> remote.
func forwardsOf(t *testing.T, url string) map[string]string {
	t.Helper()
	all, err := listForwards(url)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, f := range all {
		out[f.Local] = f.Remote
	}
	return out
}
