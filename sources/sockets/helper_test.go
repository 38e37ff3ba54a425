package sockets_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/guestagent/guestagent/internal/testenv"
)

// helperEnv makes the test binary run as a socket-holding helper process
// (see runHelper) instead of running tests.
const helperEnv = "GUESTAGENT_SOCKETS_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(runHelper(os.Stdin, os.Stdout))
	}
	os.Exit(m.Run())
}

// runHelper opens and closes sockets as told on in, one command a line,
// and answers each with "ok" or "err <reason>" on out:
//
//	listen PROTO ADDR:PORT [OPT,...]  OPT: v6only, reuse
//	close PROTO ADDR:PORT             every socket opened on it
//	flash PROTO ADDR:PORT MS          listen, wait MS milliseconds, close
//	range PROTO IP FIRST N            listen on N ports from FIRST
//	closerange PROTO IP FIRST N
//	serve PROTO ADDR:PORT             a TCP server that echoes what it gets
//	                                  and answers "bye\n" to its end, or a
//	                                  UDP server that answers "echo:" + datagram
//	client udp ADDR:PORT HOW          a UDP client that sends one datagram to
//	                                  ADDR:PORT without connecting, and stays
//	                                  open: its port picked by that send
//	                                  (HOW autobind) or by a bind to port 0
//	                                  (HOW port0)
//	churn ADDR:PORT RATE              connect to ADDR:PORT and close at once,
//	                                  RATE times a second, until in ends or
//	                                  "churn ADDR:PORT 0"
//
// It exits when in ends, which closes everything it holds.
func runHelper(in io.Reader, out io.Writer) int {
	open := map[string][]io.Closer{}
	defer func() {
		for _, cs := range open {
			for _, c := range cs {
				_ = c.Close()
			}
		}
	}()
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		err := func() error {
			if len(f) < 3 {
				return fmt.Errorf("short command %q", f)
			}
			switch f[0] {
			case "listen":
				opts := ""
				if len(f) > 3 {
					opts = f[3]
				}
				c, err := listen(f[1], f[2], opts)
				if err == nil {
					open[f[1]+" "+f[2]] = append(open[f[1]+" "+f[2]], c)
				}
				return err
			case "close":
				for _, c := range open[f[1]+" "+f[2]] {
					_ = c.Close()
				}
				delete(open, f[1]+" "+f[2])
				return nil
			case "churn":
				for _, c := range open["churn "+f[1]] {
					_ = c.Close()
				}
				delete(open, "churn "+f[1])
				rate, err := strconv.Atoi(f[2])
				if err != nil || rate < 0 {
					return fmt.Errorf("churn rate %q", f[2])
				}
				if rate > 0 {
					open["churn "+f[1]] = []io.Closer{churn(f[1], rate)}
				}
				return nil
			case "flood": // flood PROTO ADDR RATE: open and close a listener RATE times a second (0 stops)
				key := "flood " + f[1] + " " + f[2]
				for _, c := range open[key] {
					_ = c.Close()
				}
				delete(open, key)
				rate, err := strconv.Atoi(f[3])
				if err != nil || rate < 0 {
					return fmt.Errorf("flood rate %q", f[3])
				}
				if rate > 0 {
					open[key] = []io.Closer{flood(f[1], f[2], rate)}
				}
				return nil
			case "serve":
				c, err := serve(f[1], f[2])
				if err == nil {
					open[f[1]+" "+f[2]] = append(open[f[1]+" "+f[2]], c)
				}
				return err
			case "send":
				// A client's socket: bound by its first send, then
				// closed.
				c, err := net.Dial(f[1], f[2])
				if err != nil {
					return err
				}
				_, _ = c.Write([]byte("x"))
				return c.Close()
			case "client":
				if len(f) < 4 {
					return fmt.Errorf("short command %q", f)
				}
				c, err := udpClient(f[2], f[3])
				if err == nil {
					open["client "+f[2]+" "+f[3]] = append(open["client "+f[2]+" "+f[3]], c)
				}
				return err
			case "flash":
				ms, _ := strconv.Atoi(f[3])
				c, err := listen(f[1], f[2], "")
				if err != nil {
					return err
				}
				time.Sleep(time.Duration(ms) * time.Millisecond)
				return c.Close()
			case "range", "closerange":
				first, _ := strconv.Atoi(f[3])
				n, _ := strconv.Atoi(f[4])
				for p := first; p < first+n; p++ {
					addr := net.JoinHostPort(f[2], strconv.Itoa(p))
					if f[0] == "closerange" {
						for _, c := range open[f[1]+" "+addr] {
							_ = c.Close()
						}
						delete(open, f[1]+" "+addr)
						continue
					}
					c, err := listen(f[1], addr, "")
					if err != nil {
						return err
					}
					open[f[1]+" "+addr] = append(open[f[1]+" "+addr], c)
				}
				return nil
			}
			return fmt.Errorf("unknown command %q", f[0])
		}()
		if err != nil {
			fmt.Fprintf(out, "err %v\n", err)
		} else {
			fmt.Fprintln(out, "ok")
		}
	}
	return 0
}

// listen opens a TCP listener or a UDP socket on addr. An IPv6 address
// gets an AF_INET6 socket, dual-stack unless opts has v6only.
func listen(proto, addr, opts string) (io.Closer, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	network := proto + "4"
	if ap.Addr().Is6() {
		network = proto + "6"
	}
	v6only, reuse := strings.Contains(opts, "v6only"), strings.Contains(opts, "reuse")
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if ap.Addr().Is6() {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, boolInt(v6only))
			}
			if serr == nil && reuse {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	if proto == "udp" {
		return lc.ListenPacket(context.Background(), network, addr)
	}
	return lc.Listen(context.Background(), network, addr)
}

// udpClient opens an unconnected UDP socket that sends one datagram to
// addr, its port picked by the kernel (see runHelper).
func udpClient(addr, how string) (io.Closer, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	family := unix.AF_INET6
	var to unix.Sockaddr = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	var wildcard unix.Sockaddr = &unix.SockaddrInet6{}
	if ap.Addr().Is4() {
		family = unix.AF_INET
		to = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
		wildcard = &unix.SockaddrInet4{}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "udp client")
	switch how {
	case "port0":
		err = unix.Bind(fd, wildcard)
	case "autobind":
	default:
		err = fmt.Errorf("client: HOW %q is neither autobind nor port0", how)
	}
	if err == nil {
		err = unix.Sendto(fd, []byte("x"), 0, to)
	}
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// serve opens a TCP or UDP echo server on addr (see runHelper); it stops
// answering once the returned socket is closed.
func serve(proto, addr string) (io.Closer, error) {
	c, err := listen(proto, addr, "")
	if err != nil {
		return nil, err
	}
	if pc, ok := c.(net.PacketConn); ok {
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
			}
		}()
		return c, nil
	}
	ln := c.(net.Listener)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				buf := make([]byte, 2048)
				for {
					n, err := conn.Read(buf)
					if n > 0 {
						if _, err := conn.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						if err == io.EOF {
							_, _ = io.WriteString(conn, "bye\n")
						}
						return
					}
				}
			}()
		}
	}()
	return c, nil
}

// churner does something at a steady rate until closed: connect and
// disconnect (churn), open and close a listener (flood).
type churner struct {
	stop chan struct{}
	done chan struct{}
}

func churn(addr string, rate int) *churner {
	return repeat(rate, func() {
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			_ = conn.Close()
		}
	})
}

// flood opens and closes a listener on addr at a steady rate until
// closed.
func flood(proto, addr string, rate int) *churner {
	return repeat(rate, func() {
		if l, err := listen(proto, addr, ""); err == nil {
			_ = l.Close()
		}
	})
}

// repeat calls do rate times a second until closed.
func repeat(rate int, do func()) *churner {
	c := &churner{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-tick.C:
			}
			do()
		}
	}()
	return c
}

func (c *churner) Close() error {
	close(c.stop)
	<-c.done
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// helper is a running helper process inside a test's network namespace.
type helper struct {
	mu  sync.Mutex
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// startHelper runs the test binary as a helper in the namespace ns, under
// the program name name (empty keeps the test binary's own), until t ends.
func startHelper(t testing.TB, ns, name string) *helper {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if name != "" {
		exe = copyExecutable(t, exe, filepath.Join(t.TempDir(), name))
	}
	argv := testenv.InNetns(ns, exe)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, in: in, out: bufio.NewScanner(stdout)}
	t.Cleanup(h.stop)
	return h
}

func (h *helper) stop() {
	_ = h.in.Close()
	done := make(chan struct{})
	go func() { _ = h.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = h.cmd.Process.Kill()
		<-done
	}
}

// do sends one command and fails t unless the helper answers ok.
func (h *helper) do(t testing.TB, format string, args ...any) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	cmd := fmt.Sprintf(format, args...)
	if _, err := fmt.Fprintln(h.in, cmd); err != nil {
		t.Fatalf("helper %q: %v", cmd, err)
	}
	if !h.out.Scan() {
		t.Fatalf("helper %q: no answer (%v)", cmd, h.out.Err())
	}
	if got := h.out.Text(); got != "ok" {
		t.Fatalf("helper %q: %s", cmd, got)
	}
}

func copyExecutable(t testing.TB, from, to string) string {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return to
}

// listenInNetns opens, in this process, a TCP listener on addr inside the
// network namespace ns, from a thread that enters it and is then thrown
// away: a socket of the agent itself.
func listenInNetns(t testing.TB, ns, addr string) net.Listener {
	t.Helper()
	l, err := testenv.Within(ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}
