package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/hostswitch"
	"github.com/guestagent/guestagent/sinks/hostswitch/gvproxytest"
)

// Ports of TestSocketsThroughGvforwarder, held in the guest and forwarded
// on this machine: below the ephemeral range and away from the other
// tests' (the large-range test probes 8000-19999, the fault suite takes
// 20000-29999).
const (
	gvfLoopbackTCP = 7100 // on 127.0.0.1: reached through the relay
	gvfLoopbackUDP = 7101 // on 127.0.0.1: reached through the relay
	gvfAnyTCP      = 7102 // on [::], dual-stack: reached directly
	gvfAnyUDP      = 7103 // on 0.0.0.0: reached directly
)

// TestSocketsThroughGvforwarder runs the real network-tunnel path on one
// machine: gvproxy here, and a guest network namespace whose eth0 device
// gvisor-tap-vsock's gvforwarder connects to gvproxy's virtual network.
// The agent runs in the guest with the sockets source and the host-switch
// sink, reaching gvproxy's API at the gateway through the tap. Sockets a
// guest process holds on 127.0.0.1 (relayed from the guest address), on
// [::] and on 0.0.0.0 answer TCP and UDP from this machine's loopback
// through gvproxy, again after gvproxy restarts; a closed one loses its
// forward, and the agent removes the rest, and only those, when it stops.
func TestSocketsThroughGvforwarder(t *testing.T) {
	testenv.Integration(t)
	ports := []int{gvfLoopbackTCP, gvfLoopbackUDP, gvfAnyTCP, gvfAnyUDP}
	for _, p := range ports {
		if err := portsFree(p); err != nil {
			t.Fatalf("port %d must be free on this machine for gvproxy's forwards: %v", p, err)
		}
	}
	gv := gvproxytest.Start(t)
	g := gvproxytest.StartGuest(t, gv)

	// Two sockets exist before the agent starts, two come after.
	loTCP := serveIn(t, g, "tcp4", fmt.Sprintf("127.0.0.1:%d", gvfLoopbackTCP))
	loUDP := serveIn(t, g, "udp4", fmt.Sprintf("127.0.0.1:%d", gvfLoopbackUDP))
	agent := startAgentIn(t, g, "--adminInstall", "--sources=sockets", "--sinks=host-switch",
		"--hostSwitchURL=http://"+gvproxytest.GatewayIP, "--hostSwitchCheckInterval=1s")
	want := map[string]string{
		fmt.Sprintf("tcp 127.0.0.1:%d", gvfLoopbackTCP): fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, gvfLoopbackTCP),
		fmt.Sprintf("udp 127.0.0.1:%d", gvfLoopbackUDP): fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, gvfLoopbackUDP),
	}
	waitForwards(t, gv, agent, "the loopback-only sockets' forwards", want, nil)
	serveIn(t, g, "tcp", fmt.Sprintf("[::]:%d", gvfAnyTCP)) // "tcp6" would make it IPv6-only
	serveIn(t, g, "udp4", fmt.Sprintf("0.0.0.0:%d", gvfAnyUDP))
	want[fmt.Sprintf("tcp 0.0.0.0:%d", gvfAnyTCP)] = fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, gvfAnyTCP)
	want[fmt.Sprintf("udp 0.0.0.0:%d", gvfAnyUDP)] = fmt.Sprintf("%s:%d", hostswitch.DefaultGuestIP, gvfAnyUDP)
	waitForwards(t, gv, agent, "the forwards of every socket", want, nil)

	// 1 MiB each way, then our end closed first: the guest's server only
	// answers "bye" once it has read that end.
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	exchange(t, "", payload, ports...)

	// A restarted gvproxy has lost the forwards and the guest's link.
	// Once the guest is back on the network the agent, seeing the
	// forwards gone on its next check, exposes every port again, and the
	// relays still answer.
	gv.Stop()
	gv.Start()
	t.Logf("eth0 set up again %d times after gvproxy restarted", g.Rejoin())
	waitForwards(t, gv, agent, "the forwards back after gvproxy restarted", want, nil)
	exchange(t, "after gvproxy restarted: ", payload[:64<<10], ports...)

	// A socket that closes loses its forward, and gvproxy its listener.
	loTCP.Close()
	loUDP.Close()
	gone := []string{fmt.Sprintf("tcp 127.0.0.1:%d", gvfLoopbackTCP), fmt.Sprintf("udp 127.0.0.1:%d", gvfLoopbackUDP)}
	for _, k := range gone {
		delete(want, k)
	}
	waitForwards(t, gv, agent, "the closed sockets' forwards to go", want, gone)
	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", gvfLoopbackTCP), 5*time.Second)
	if err == nil {
		c.Close()
		t.Errorf("127.0.0.1:%d still accepts connections after its forward went", gvfLoopbackTCP)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("127.0.0.1:%d after its forward went: %v; want the connection refused", gvfLoopbackTCP, err)
	}

	// On SIGTERM the agent removes what it exposed, through the tap, and
	// leaves gvproxy's own forwards.
	if code := agent.stop(); code != 0 {
		t.Fatalf("agent exited with %d on SIGTERM\n%s", code, agent.logTail())
	}
	all, err := forwardsByKey(gv.URL())
	if err != nil {
		t.Fatal(err)
	}
	for k, remote := range all {
		if strings.HasPrefix(remote, hostswitch.DefaultGuestIP+":") && gv.Static()[strings.Fields(k)[1]] != remote {
			t.Errorf("after the agent stopped, gvproxy still forwards %s -> %s", k, remote)
		}
	}
	for local, remote := range gv.Static() {
		if all["tcp "+local] != remote {
			t.Errorf("gvproxy's own forward %s -> %s is gone (forwards: %v)", local, remote, all)
		}
	}
}

// exchange sends payload over TCP (tcpEcho) and a datagram over UDP
// (udpEcho) to each of ports on this machine's loopback, where gvproxy
// forwards them to the guest, and stops the test on a failure.
func exchange(t *testing.T, stage string, payload []byte, ports ...int) {
	t.Helper()
	for _, p := range ports {
		addr := fmt.Sprintf("127.0.0.1:%d", p)
		if p == gvfLoopbackUDP || p == gvfAnyUDP {
			if err := udpEcho(addr); err != nil {
				t.Errorf("%sUDP through gvproxy to the guest's port %d: %v", stage, p, err)
			}
		} else if err := tcpEcho(addr, payload); err != nil {
			t.Errorf("%sTCP through gvproxy to the guest's port %d: %v", stage, p, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// portsFree reports an error unless port is free for TCP and UDP on every
// address of this machine.
func portsFree(port int) error {
	l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return err
	}
	l.Close()
	pc, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return err
	}
	return pc.Close()
}

// guestAgent is the agent running as its own process in the guest.
type guestAgent struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	code int
}

// startAgentIn runs this test binary as the agent (main, as agentEnv tells
// it) in the guest's namespace, with a state directory and control socket
// of the test's own, until the test ends.
func startAgentIn(t *testing.T, g *gvproxytest.Guest, args ...string) *guestAgent {
	t.Helper()
	return startAgentInNetns(t, g.Netns, args...)
}

// startAgentInNetns runs the agent as startAgentIn does, in the network
// namespace ns (a name under /var/run/netns).
func startAgentInNetns(t *testing.T, ns string, args ...string) *guestAgent {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	a := &guestAgent{log: filepath.Join(t.TempDir(), "agent.log"), done: make(chan struct{})}
	log, err := os.Create(a.log)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	argv := testenv.InNetns(ns, append([]string{exe}, isolated(t, args)...)...)
	a.cmd = exec.Command(argv[0], argv[1:]...)
	a.cmd.Env = append(os.Environ(), agentEnv+"=1")
	a.cmd.Stdout, a.cmd.Stderr = log, log
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("starting the agent in the guest: %v", err)
	}
	go func() {
		_ = a.cmd.Wait()
		a.code = a.cmd.ProcessState.ExitCode()
		close(a.done)
	}()
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("agent log:\n%s", a.logTail())
		}
	})
	return a
}

// stop ends the agent with SIGTERM (SIGKILL after 30 s) and returns its
// exit code; it may be called again.
func (a *guestAgent) stop() int {
	select {
	case <-a.done:
		return a.code
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
	return a.code
}

func (a *guestAgent) exited() bool {
	select {
	case <-a.done:
		return true
	default:
		return false
	}
}

func (a *guestAgent) logTail() string { return fileTail(a.log, 30) }

// fileTail returns the last n lines of the file at path.
func fileTail(path string, n int) string {
	out, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// echoServer is a socket this test process holds in the guest (so the
// agent sees another process's socket). On TCP it echoes each connection
// and, once the peer has closed its side, writes "bye\n" and closes; on UDP
// it answers each datagram with "echo:" and the datagram.
type echoServer struct {
	sock  io.Closer
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool // nil once closed
	once  sync.Once
}

// serveIn opens an echo server on addr over network (as net.Listen and
// net.ListenPacket take them) in the guest, until Close or the end of the
// test. Go makes "tcp" on [::] dual-stack, "tcp6" IPv6-only.
func serveIn(t *testing.T, g *gvproxytest.Guest, network, addr string) *echoServer {
	t.Helper()
	s := &echoServer{conns: map[net.Conn]bool{}}
	err := g.In(func() (err error) {
		if strings.HasPrefix(network, "udp") {
			s.sock, err = net.ListenPacket(network, addr)
		} else {
			s.sock, err = net.Listen(network, addr)
		}
		return err
	})
	if err != nil {
		t.Fatalf("listening on %s/%s in the guest: %v", network, addr, err)
	}
	t.Cleanup(s.Close)
	s.wg.Add(1)
	switch sock := s.sock.(type) {
	case net.PacketConn:
		go s.answerUDP(sock)
	case net.Listener:
		go s.acceptTCP(sock)
	}
	return s
}

func (s *echoServer) answerUDP(pc net.PacketConn) {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
	}
}

func (s *echoServer) acceptTCP(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.conns == nil {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = true
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			defer s.drop(c)
			if _, err := io.Copy(c, c); err == nil {
				_, _ = io.WriteString(c, "bye\n")
			}
		}()
	}
}

func (s *echoServer) drop(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Close closes the socket and its connections and waits for the server's
// goroutines.
func (s *echoServer) Close() {
	s.once.Do(func() {
		s.sock.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.conns = nil
		s.mu.Unlock()
		s.wg.Wait()
	})
}

// tcpEcho sends payload to addr's echo server, closes its sending side,
// and checks that the payload comes back followed by "bye\n" and the end
// of the stream: the server saw our half-close and closed its own.
func tcpEcho(addr string, payload []byte) error {
	c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	sent := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		sent <- err
	}()
	got, readErr := io.ReadAll(c)
	if err := <-sent; err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	want := append(slices.Clip(payload), "bye\n"...)
	switch {
	case bytes.Equal(got, want):
		return nil
	case readErr != nil && bytes.Equal(got, payload):
		return fmt.Errorf("the payload came back but not the answer to our half-close: %w", readErr)
	case readErr != nil:
		return fmt.Errorf("after %d of %d bytes: %w", len(got), len(want), readErr)
	default:
		return fmt.Errorf("got %d bytes, want %d (the payload and \"bye\\n\"); equal prefix %d", len(got), len(want), commonPrefix(got, want))
	}
}

func commonPrefix(a, b []byte) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

// udpEcho sends a datagram to addr from one socket, then from another
// while the first one's session is still open, and checks that each gets
// its own answer from addr, resending while none arrives (UDP may drop
// one).
func udpEcho(addr string) error {
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for range 2 {
		c, err := net.Dial("udp4", addr)
		if err != nil {
			return err
		}
		clients = append(clients, c)
	}
	deadline := time.Now().Add(15 * time.Second)
	for i, c := range clients {
		msg := fmt.Sprintf("ping %d from %s", i, c.LocalAddr())
		want := "echo:" + msg
		buf := make([]byte, 2048)
		for {
			if _, err := c.Write([]byte(msg)); err != nil {
				return fmt.Errorf("client %d: %w", i, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			n, err := c.Read(buf)
			if err == nil && string(buf[:n]) == want {
				break
			}
			if err == nil {
				return fmt.Errorf("client %d got %q, want %q", i, buf[:n], want)
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("client %d: no answer: %w", i, err)
			}
		}
	}
	return nil
}

// forwardsByKey lists gvproxy's forwards as "proto local" -> remote.
func forwardsByKey(url string) (map[string]string, error) {
	all, err := listForwards(url)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(all))
	for _, f := range all {
		out[f.Protocol+" "+f.Local] = f.Remote
	}
	return out, nil
}

// waitForwards waits until gvproxy holds every forward of want (as
// "proto local" -> remote) and none of gone, failing at once if the agent
// exits.
func waitForwards(t *testing.T, gv *gvproxytest.Gvproxy, agent *guestAgent, what string, want map[string]string, gone []string) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, what, func() (bool, string) {
		if agent.exited() {
			t.Fatalf("the agent exited (%d) while waiting for %s\n%s", agent.code, what, agent.logTail())
		}
		all, err := forwardsByKey(gv.URL())
		if err != nil {
			return false, err.Error()
		}
		for k, remote := range want {
			if all[k] != remote {
				return false, fmt.Sprintf("%s -> %q, want %q; forwards: %s", k, all[k], remote, mustJSON(all))
			}
		}
		for _, k := range gone {
			if r, ok := all[k]; ok {
				return false, fmt.Sprintf("%s -> %s still there", k, r)
			}
		}
		return true, ""
	})
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
