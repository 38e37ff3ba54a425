package gvproxytest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/internal/testenv"
)

// The guest's side of the virtual network that Start configures.
const (
	// GuestIP is the guest's address; gvproxy's DHCP lease gives it to
	// GuestMAC.
	GuestIP  = "192.168.127.2"
	GuestMAC = "5a:94:ef:e4:0c:ee"
	// GatewayIP is gvproxy's address on the network, where the guest
	// reaches the forwarder API on port 80.
	GatewayIP = "192.168.127.1"
	// TapName is the guest's tap device.
	TapName = "eth0" // as in the desktop app's guest
)

// Guest is a network namespace on gvproxy's virtual network, as a VM is:
// its tap device carries GuestIP/24 with the default route to GatewayIP,
// and gvisor-tap-vsock's gvforwarder passes its frames to gvproxy over
// Socket. It is the real network-tunnel path on one machine.
type Guest struct {
	// Netns is the namespace's name (under /var/run/netns).
	Netns string

	t        testing.TB
	log      string
	exited   <-chan error // gvforwarder's end
	client   *http.Client
	joinedAt time.Time // when eth0 was last set up
}

// StartGuest makes a namespace with eth0 set up, runs gvforwarder (from
// GUESTAGENT_GVFORWARDER or PATH) in it on g's socket until the test ends,
// and waits until the forwarder API answers from inside the guest at
// GatewayIP. After g restarts, call Rejoin.
func StartGuest(t testing.TB, g *Gvproxy) *Guest {
	t.Helper()
	forwarder := testenv.Binary(t, "GUESTAGENT_GVFORWARDER", "gvforwarder")
	gu := &Guest{Netns: testenv.Netns(t), t: t, log: filepath.Join(t.TempDir(), "gvforwarder.log")}
	testenv.RunIn(t, gu.Netns, "ip", "tuntap", "add", TapName, "mode", "tap")
	t.Cleanup(func() { // gvforwarder deletes it when it exits; in case it did not run
		argv := testenv.InNetns(gu.Netns, "ip", "link", "delete", TapName)
		_ = exec.Command(argv[0], argv[1:]...).Run()
	})
	if err := gu.configureTap(); err != nil {
		t.Fatal(err)
	}
	gu.client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext:       gu.Dial,
	}}

	log, err := os.Create(gu.log)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	// -preexisting: the tap is configured here, with no DHCP client;
	// -stop-if-exist "": gvforwarder otherwise exits at once when the
	// namespace has an eth0.
	argv := testenv.InNetns(gu.Netns, forwarder, "-url", "unix://"+g.Socket(), "-iface", TapName, "-preexisting", "-stop-if-exist", "")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting gvforwarder: %v", err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() { exited <- cmd.Wait(); close(done) }()
	gu.exited = exited
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("gvforwarder's output:\n%s", gu.Log())
		}
	})
	testenv.Eventually(t, 15*time.Second, "the forwarder API from inside the guest at http://"+GatewayIP, gu.reachesAPI)
	return gu
}

// Path is the namespace's path.
func (gu *Guest) Path() string { return "/var/run/netns/" + gu.Netns }

// Client is an HTTP client whose connections are made inside the guest
// (to http://GatewayIP/services/forwarder/..., say).
func (gu *Guest) Client() *http.Client { return gu.client }

// Dial connects to addr from inside the guest, as net.Dialer.DialContext
// does; the connection goes through eth0 and gvproxy's network when addr
// is beyond the guest (GatewayIP, say). It suits http.Transport's
// DialContext and the sinks' Dial.
func (gu *Guest) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := gu.In(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens on addr inside the guest, as net.Listen does: on
// GuestIP, a forward to it through gvproxy reaches the listener.
func (gu *Guest) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := gu.In(func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// ListenPacket is Listen for datagrams, as net.ListenPacket.
func (gu *Guest) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := gu.In(func() (err error) {
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// In runs f on a thread that enters the guest's namespace. The thread is
// never handed back to the runtime (it ends with its goroutine), so
// nothing else runs there; the sockets f makes stay in the guest.
func (gu *Guest) In(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := os.Open(gu.Path())
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering %s: %w", gu.Path(), err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// Log returns the last lines gvforwarder wrote.
func (gu *Guest) Log() string {
	out, err := os.ReadFile(gu.log)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}

// Rejoin waits, after gvproxy restarted, until the guest reaches the API
// again, setting eth0 up again whenever it lacks GuestIP, as the guest's
// network set-up would: gvforwarder (v0.8.9) clears the tap's persistent
// flag, so eth0 goes when gvproxy drops the connection, and the one
// gvforwarder makes when it connects again is blank, -preexisting
// notwithstanding. It reports how many times it set eth0 up; Joined says
// when it last did.
func (gu *Guest) Rejoin() int {
	gu.t.Helper()
	n := 0
	testenv.Eventually(gu.t, 30*time.Second, "the guest back on gvproxy's network", func() (bool, string) {
		argv := testenv.InNetns(gu.Netns, "ip", "-o", "addr", "show", "dev", TapName)
		out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		if err != nil {
			return false, fmt.Sprintf("%s: %v: %s", TapName, err, bytes.TrimSpace(out))
		}
		if !strings.Contains(string(out), " "+GuestIP+"/24 ") {
			if err := gu.configureTap(); err != nil {
				return false, err.Error()
			}
			n++
		}
		return gu.reachesAPI()
	})
	return n
}

// Joined is when eth0 was last set up, by StartGuest or Rejoin: from
// then on the guest is on gvproxy's network.
func (gu *Guest) Joined() time.Time { return gu.joinedAt }

// configureTap gives eth0 the guest's MAC address, its address and the
// default route to the gateway, and brings it up.
func (gu *Guest) configureTap() error {
	for _, argv := range [][]string{
		{"ip", "link", "set", TapName, "address", GuestMAC},
		{"ip", "addr", "add", GuestIP + "/24", "dev", TapName},
		{"ip", "link", "set", TapName, "up"},
		{"ip", "route", "add", "default", "via", GatewayIP},
	} {
		full := testenv.InNetns(gu.Netns, argv...)
		if out, err := exec.Command(full[0], full[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s in the guest: %v: %s", strings.Join(argv, " "), err, bytes.TrimSpace(out))
		}
	}
	gu.joinedAt = time.Now()
	return nil
}

// reachesAPI reports whether the forwarder API answers from inside the
// guest at the gateway, or why not; it stops the test if gvforwarder
// exited.
func (gu *Guest) reachesAPI() (bool, string) {
	select {
	case err := <-gu.exited:
		gu.t.Fatalf("gvforwarder exited (%v):\n%s", err, gu.Log())
	default:
	}
	res, err := gu.client.Get("http://" + GatewayIP + "/services/forwarder/all")
	if err != nil {
		return false, err.Error()
	}
	res.Body.Close()
	return res.StatusCode == http.StatusOK, res.Status
}
