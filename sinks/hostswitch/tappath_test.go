package hostswitch_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

// startTapPath is the network-tunnel path end to end, with no VM: gvproxy
// with its virtual network on a unix socket, and a guest
// (gvproxytest.StartGuest) whose tap device gvforwarder connects to it,
// from where the sink reaches the API at the gateway,
// http://192.168.127.1:80, as hostswitch.DefaultBaseURL says. Restarted
// (Stop, Start, then the guest's Rejoin), gvproxy has a new network stack
// behind the same gateway address, as host-switch has when the desktop app
// restarts it.
func startTapPath(t testing.TB) (*gvproxytest.Gvproxy, *gvproxytest.Guest) {
	t.Helper()
	g := gvproxytest.Start(t)
	return g, gvproxytest.StartGuest(t, g)
}

// TestRestartOnTheTapPath restarts gvproxy behind the gateway address the
// guest reaches through gvforwarder: the guest's connections stay open
// (nothing tells the guest's kernel), and the new network stack knows
// nothing of them. With the periodic full check off, the probe notices, a
// reconcile runs and the forwards come back.
func TestRestartOnTheTapPath(t *testing.T) {
	g, guest := startTapPath(t)
	r, logs := startProbedRouter(t, hostswitch.DefaultBaseURL, core.RouterConfig{SyncGrace: 100 * time.Millisecond}, guest.Dial)
	ports := []int{testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)}
	r.Emitter("docker").Set(loopbackPorts("a", ports...))
	t.Cleanup(func() {
		if t.Failed() {
			for _, e := range logs.All() {
				t.Log(e.Time.Format("05.000"), e.Message, e.ContextMap())
			}
		}
	})
	waitForwards(t, g, tcpLocal(ports...))
	for round := range 2 {
		syncs, noticed := sinkStatus(t, r).Syncs, probeNoticed(logs)
		g.Stop()
		g.Start()
		guest.Rejoin()
		testenv.Eventually(t, 30*time.Second, fmt.Sprintf("the forwards after restart %d", round), forwardsAre(t, g, tcpLocal(ports...)))
		if got := probeNoticed(logs); got <= noticed {
			t.Errorf("restart %d: the probe logged nothing about it (log: %v)", round, messages(logs))
		}
		if got := sinkStatus(t, r).Syncs; got <= syncs {
			t.Errorf("restart %d: %d reconciles before, %d after; want one more", round, syncs, got)
		}
	}
	checkStaticKept(t, g)
	t.Logf("sink log: %v", messages(logs))
}
