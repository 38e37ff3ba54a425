package wslproxytest_test

import (
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/sinks/wslproxy/wslproxytest"
)

// send writes msg on one connection to p and waits until p has read it.
func send(t *testing.T, p *wslproxytest.Peer, msg string) {
	t.Helper()
	c, err := net.Dial("unix", p.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.UnixConn).CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil { // the peer closes once it has read the message
		t.Fatal(err)
	}
}

// TestListenersAreKeyedByPort: as wsl-proxy, the peer has one listener per
// protocol and port: an add at another address while the port is held is
// an error and changes nothing, and a remove at any address closes it.
func TestListenersAreKeyedByPort(t *testing.T) {
	p := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	const (
		addLoopback = `{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"11301"}]}}`
		addAny      = `{"remove":false,"ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"11301"}]}}`
		addUDP      = `{"remove":false,"ports":{"80/udp":[{"HostIp":"0.0.0.0","HostPort":"11301"}]}}`
		removeAny   = `{"remove":true,"ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"11301"}]}}`
	)
	send(t, p, addLoopback)
	send(t, p, addAny)
	send(t, p, addUDP) // another protocol is another listener
	if got, want := p.State(), []string{"tcp 127.0.0.1:11301", "udp 0.0.0.0:11301"}; !slices.Equal(got, want) {
		t.Errorf("state %q, want %q", got, want)
	}
	if err := p.Err(); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Errorf("Err() = %v, want the add at 0.0.0.0 refused", err)
	}
	send(t, p, removeAny)
	if got, want := p.State(), []string{"udp 0.0.0.0:11301"}; !slices.Equal(got, want) {
		t.Errorf("after a remove at 0.0.0.0: state %q, want %q", got, want)
	}
}

// TestUDPGoesOneWay: a datagram to a UDP port the peer opened reaches the
// upstream, and nothing comes back to its sender, as with wsl-proxy.
func TestUDPGoesOneWay(t *testing.T) {
	up, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	hostPort := func() int {
		l, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.LocalAddr().(*net.UDPAddr).Port
	}()
	p := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), Upstream: func(uint16) string { return up.LocalAddr().String() }}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	send(t, p, fmt.Sprintf(`{"remove":false,"ports":{"53/udp":[{"HostIp":"127.0.0.1","HostPort":"%d"}]}}`, hostPort))
	if err := p.Err(); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", hostPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("query")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_ = up.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := up.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "query" {
		t.Fatalf("upstream read %q, %v", buf[:n], err)
	}
	if _, err := up.WriteTo([]byte("answer"), from); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(buf); err == nil {
		t.Errorf("the sender got %q back", buf[:n])
	}
}

// TestCutShortIsCountedApart: a connection closed before its message
// ended (nothing, or part of a document) is what a sender killed mid-send
// leaves: counted by Truncated, not an error; a malformed one is an error.
func TestCutShortIsCountedApart(t *testing.T) {
	p := &wslproxytest.Peer{Path: filepath.Join(t.TempDir(), "wsl-proxy.sock"), RecordOnly: true}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	send(t, p, "")
	send(t, p, `{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1",`)
	if n := p.Truncated(); n != 2 {
		t.Errorf("Truncated() = %d, want 2", n)
	}
	if err := p.Err(); err != nil {
		t.Errorf("Err() = %v for messages cut short", err)
	}
	send(t, p, `{"remove":nope}`)
	if err := p.Err(); err == nil {
		t.Error("a malformed message is no error")
	}
}
