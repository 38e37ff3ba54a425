package vtunneltest_test

import (
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sinks/vtunnel/vtunneltest"
)

func TestParseRefusesMalformedMessages(t *testing.T) {
	good := []string{
		`{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]},"connectAddrs":[{"network":"ip+net","addr":"192.168.1.2/24"}]}`,
		`{"remove":true,"ports":{"53/udp":[{"HostIp":"0.0.0.0","HostPort":"5353"}]},"connectAddrs":[{"network":"tcp","addr":"10.4.0.22:53"}]}` + "\n",
		`{"remove":false,"ports":{"80/tcp":[{"HostIp":"","HostPort":"8080"}]},"connectAddrs":null}`,
	}
	for _, m := range good {
		if _, _, err := vtunneltest.Parse([]byte(m)); err != nil {
			t.Errorf("%s refused: %v", m, err)
		}
	}
	bad := map[string]string{
		"not JSON":        `remove 8080`,
		"cut short":       `{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"80`,
		"two documents":   `{"ports":{"80/tcp":[{"HostPort":"8080"}]}}{"ports":{"81/tcp":[{"HostPort":"8081"}]}}`,
		"trailing bytes":  `{"ports":{"80/tcp":[{"HostPort":"8080"}]}} x`,
		"no port":         `{"remove":false,"ports":{},"connectAddrs":[]}`,
		"no host port":    `{"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":""}]}}`,
		"host port 0":     `{"ports":{"80/tcp":[{"HostPort":"0"}]}}`,
		"unknown proto":   `{"ports":{"80/icmp":[{"HostPort":"8080"}]}}`,
		"bad connectAddr": `{"ports":{"80/tcp":[{"HostPort":"8080"}]},"connectAddrs":[{"network":"ip+net","addr":"eth0"}]}`,
		"bad network":     `{"ports":{"80/tcp":[{"HostPort":"8080"}]},"connectAddrs":[{"network":"unix","addr":"/x"}]}`,
		"ports not a map": `{"ports":[80]}`,
	}
	for name, m := range bad {
		if _, _, err := vtunneltest.Parse([]byte(m)); err == nil {
			t.Errorf("%s: %s accepted", name, m)
		}
	}
}

// send writes msg on one connection to p and closes it, as the sink does.
func send(t *testing.T, p *vtunneltest.Peer, msg string) {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	// The peer closes once it has read the message.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Fatal(err)
	}
}

func start(t *testing.T) *vtunneltest.Peer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &vtunneltest.Peer{}
	p.Start(ln)
	t.Cleanup(p.Stop)
	return p
}

const (
	addLoopback = `{"remove":false,"ports":{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"41401"}]}}`
	addAny      = `{"remove":false,"ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"41401"}]}}`
	removeAny   = `{"remove":true,"ports":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"41401"}]}}`
)

// TestStateIsKeyedByPort: a remove at another address drops the port; an
// add at another address while the port is held is an error and changes
// nothing.
func TestStateIsKeyedByPort(t *testing.T) {
	p := start(t)
	send(t, p, addLoopback)
	send(t, p, addAny)
	send(t, p, addLoopback) // the same again is fine
	if got, want := p.State(), []string{"tcp 127.0.0.1:41401"}; !slices.Equal(got, want) {
		t.Errorf("state %q, want %q", got, want)
	}
	if err := p.Err(); err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Errorf("Err() = %v, want the add at 0.0.0.0 refused", err)
	}
	send(t, p, removeAny)
	if got := p.State(); len(got) != 0 {
		t.Errorf("after a remove at 0.0.0.0: state %q, want none", got)
	}
}

// TestChecksAndBadMessages: an empty connection is a check and changes
// nothing; a malformed message is an error and changes nothing; a stop
// loses the state.
func TestChecksAndBadMessages(t *testing.T) {
	p := start(t)
	send(t, p, "")
	send(t, p, addLoopback+addAny)
	testenv.Eventually(t, 5*time.Second, "the check counted", func() (bool, string) {
		return p.Checks() == 1, "not yet"
	})
	if p.Err() == nil || len(p.Received()) != 0 || len(p.State()) != 0 {
		t.Errorf("two documents on one connection: err %v, received %d, state %q", p.Err(), len(p.Received()), p.State())
	}
	send(t, p, addLoopback)
	addr := p.Addr().String()
	p.Stop()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	p.Start(ln)
	if got := p.State(); len(got) != 0 {
		t.Errorf("after a restart: state %q, want none", got)
	}
	if got := len(p.Received()); got != 1 {
		t.Errorf("received %d messages, want the one add kept across restarts", got)
	}
}
