package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// startAgent runs the agent in-process with args; the returned stop ends
// it and fails the test if it exited with an error, and logs receives
// its log. The test's cleanup stops it too.
func startAgent(t *testing.T, args ...string) (stop func(), logs *syncBuffer) {
	t.Helper()
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- run(ctx, args, &out, &errOut) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("agent exit %d: %s", code, errOut.String())
		}
	})
	t.Cleanup(stop)
	return stop, &errOut
}

// statusUp waits until the agent answers GET /status on addr.
func statusUp(t *testing.T, addr string) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	testenv.Eventually(t, 15*time.Second, "GET /status on "+addr, func() (bool, string) {
		res, err := client.Get("http://" + addr + "/status")
		if err != nil {
			return false, err.Error()
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res.StatusCode == http.StatusOK, res.Status
	})
	client.CloseIdleConnections()
}

// controlSocketAnswers waits until `guestagent status` reads the agent's
// state over sock.
func controlSocketAnswers(t *testing.T, sock string) {
	t.Helper()
	c := newControlClient(sock)
	testenv.Eventually(t, 15*time.Second, "status over "+sock, func() (bool, string) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		st, err := c.status(ctx)
		return err == nil && len(st.Mappings) == 1, fmt.Sprint(err)
	})
}

// TestControlSocketKeepsItsDirectoryAsItIs runs the agent with its
// control socket in a shared sticky directory (1777, as /tmp), in an
// existing 0755 directory and in a missing one: the socket is 0600 and
// answers, an existing directory keeps its mode and sticky bit, a missing
// one is created 0700, nothing else is left in it, and the socket goes
// when the agent stops.
func TestControlSocketKeepsItsDirectoryAsItIs(t *testing.T) {
	for _, tt := range []struct {
		name string
		mode fs.FileMode // of the existing directory; 0: missing
		want fs.FileMode
	}{
		{"shared-sticky", fs.ModeSticky | 0o777, fs.ModeSticky | 0o777},
		{"existing-0755", 0o755, 0o755},
		{"missing", 0, 0o700},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run")
			if tt.mode != 0 {
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dir, tt.mode); err != nil {
					t.Fatal(err)
				}
			}
			sock := filepath.Join(dir, "ga.sock")
			stop, _ := startAgent(t, "--sources=static", "--staticFile="+writeStatic(t), "--sinks=stdout",
				"--stateDir="+t.TempDir(), "--controlSocket="+sock)
			controlSocketAnswers(t, sock)
			fi, err := os.Lstat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
				t.Errorf("the control socket is %s, want a socket 0600", fi.Mode())
			}
			dirMode := func() fs.FileMode {
				di, err := os.Stat(dir)
				if err != nil {
					t.Fatal(err)
				}
				return di.Mode() & (fs.ModePerm | fs.ModeSticky)
			}
			if got := dirMode(); got != tt.want {
				t.Errorf("the directory is %s, want %s", got, tt.want)
			}
			if names := dirNames(t, dir); len(names) != 1 || names[0] != "ga.sock" {
				t.Errorf("the directory holds %q, want the socket alone", names)
			}
			stop()
			if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the socket is still there after the agent stopped: %v", err)
			}
			if got := dirMode(); got != tt.want {
				t.Errorf("after the agent stopped the directory is %s, want %s", got, tt.want)
			}
		})
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// TestControlSocketPathHoldingSomethingElse puts at the control socket's
// path a regular file, a directory, symbolic links (to a missing path, to
// a file, to a stale socket) and a socket another process answers on: the
// agent refuses to start, says why, and leaves each as it was. A stale
// socket (nobody answers) is replaced.
func TestControlSocketPathHoldingSomethingElse(t *testing.T) {
	staleSocket := func(t *testing.T, path string) {
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	}
	for _, tt := range []struct {
		name  string
		setup func(t *testing.T, path string) (check func(t *testing.T))
		want  string // in the error; empty: the agent starts
	}{
		{"regular-file", func(t *testing.T, path string) func(*testing.T) {
			writeFile(t, path, "keep me")
			return func(t *testing.T) { fileHolds(t, path, "keep me") }
		}, "exists and is not a socket"},
		{"directory", func(t *testing.T, path string) func(*testing.T) {
			if err := os.Mkdir(path, 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(path, "inside"), "keep me")
			return func(t *testing.T) { fileHolds(t, filepath.Join(path, "inside"), "keep me") }
		}, "exists and is not a socket"},
		{"symlink-to-missing", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "target.sock")
			symlink(t, target, path)
			return func(t *testing.T) {
				linksTo(t, path, target)
				if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("the link's target was created: %v", err)
				}
			}
		}, "symbolic link"},
		{"symlink-to-file", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "passwd")
			writeFile(t, target, "root:x:0:0")
			symlink(t, target, path)
			return func(t *testing.T) { linksTo(t, path, target); fileHolds(t, target, "root:x:0:0") }
		}, "symbolic link"},
		{"symlink-to-stale-socket", func(t *testing.T, path string) func(*testing.T) {
			target := filepath.Join(t.TempDir(), "s")
			staleSocket(t, target)
			symlink(t, target, path)
			return func(t *testing.T) {
				linksTo(t, path, target)
				if fi, err := os.Lstat(target); err != nil || fi.Mode().Type() != fs.ModeSocket {
					t.Errorf("the link's target changed: %v %v", fi, err)
				}
			}
		}, "symbolic link"},
		{"live-socket", func(t *testing.T, path string) func(*testing.T) {
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			return func(t *testing.T) {
				c, err := net.Dial("unix", path)
				if err != nil {
					t.Errorf("the other process's socket no longer answers: %v", err)
					return
				}
				c.Close()
			}
		}, "another agent is running"},
		{"stale-socket", func(t *testing.T, path string) func(*testing.T) {
			staleSocket(t, path)
			return func(t *testing.T) {}
		}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ga.sock")
			check := tt.setup(t, path)
			args := []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--stateDir=" + t.TempDir(), "--controlSocket=" + path}
			if tt.want == "" {
				startAgent(t, args...)
				controlSocketAnswers(t, path)
				check(t)
				return
			}
			var out, errOut syncBuffer
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if code := run(ctx, args, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), tt.want) {
				t.Errorf("exit %d, %q; want 2 and %q", code, errOut.String(), tt.want)
			}
			check(t)
			if names := dirNames(t, dir); len(names) != 1 {
				t.Errorf("the directory holds %q, want what the test put there alone", names)
			}
		})
	}
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func fileHolds(t *testing.T, path, want string) {
	t.Helper()
	if b, err := os.ReadFile(path); err != nil || string(b) != want {
		t.Errorf("%s holds %q (%v), want %q", path, b, err, want)
	}
}

func symlink(t *testing.T, target, path string) {
	t.Helper()
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

func linksTo(t *testing.T, path, target string) {
	t.Helper()
	if got, err := os.Readlink(path); err != nil || got != target {
		t.Errorf("%s links to %q (%v), want %q", path, got, err, target)
	}
}

// agentConns counts the TCP connections to local port port whose socket
// this process holds a descriptor of: with the agent in-process, those
// it accepted (the test's own ends have port as their remote port, and
// connections still in the backlog have no descriptor).
func agentConns(t *testing.T, port int) int {
	t.Helper()
	held := map[string]bool{}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil {
			if ino, ok := strings.CutPrefix(l, "socket:["); ok {
				held[strings.TrimSuffix(ino, "]")] = true
			}
		}
	}
	conns := map[string]bool{} // by inode: a table read while it changes may repeat rows
	// The tables of this thread's network namespace: /proc/self/net is
	// the main thread's, which a test that entered another namespace on
	// it may have left there for good.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, file := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
		data, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(data)) {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] == "0A" { // the header, a listener
				continue
			}
			_, hexPort, _ := strings.Cut(f[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); err == nil && int(p) == port && held[f[9]] {
				conns[f[9]] = true
			}
		}
	}
	return len(conns)
}

// TestIdleClientsDoNotExhaustTheStatusServer opens more connections to
// the status address than the agent serves at once and sends nothing on
// them, and leaves one keep-alive connection idle after a request: the
// agent never holds more than maxConns of them, closes each (the header
// timeout, the idle timeout), and a fresh client still gets /status.
func TestIdleClientsDoNotExhaustTheStatusServer(t *testing.T) {
	t.Parallel()
	port := testenv.FreePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	_, logs := startAgent(t, isolated(t, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--statusAddr=" + addr})...)
	statusUp(t, addr)

	keepAlive, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer keepAlive.Close()
	fmt.Fprintf(keepAlive, "GET /status HTTP/1.1\r\nHost: agent\r\n\r\n")
	br := bufio.NewReader(keepAlive)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /status on the keep-alive connection: %v %v", res, err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()

	idle := make([]net.Conn, maxConns+maxConns/2)
	for i := range idle {
		if idle[i], err = net.Dial("tcp", addr); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		defer idle[i].Close()
	}
	most := 0
	testenv.Eventually(t, 15*time.Second, "the agent to accept maxConns connections", func() (bool, string) {
		most = max(most, agentConns(t, port))
		return most >= maxConns, fmt.Sprint(most)
	})
	fresh := make(chan error, 1)
	go func() {
		client := &http.Client{Timeout: time.Minute}
		defer client.CloseIdleConnections()
		res, err := client.Get("http://" + addr + "/status")
		if err == nil {
			var st struct{ Mappings []json.RawMessage }
			err = json.NewDecoder(res.Body).Decode(&st)
			res.Body.Close()
			if err == nil && (res.StatusCode != http.StatusOK || len(st.Mappings) != 1) {
				err = fmt.Errorf("%s, %d mappings", res.Status, len(st.Mappings))
			}
		}
		fresh <- err
	}()
	// Each idle connection must be closed by the agent: a read ends.
	closed := make(chan int, len(idle)+1)
	for i, c := range append(idle, keepAlive) {
		go func() {
			_ = c.SetReadDeadline(time.Now().Add(time.Minute))
			var err error
			if c == keepAlive {
				_, err = br.ReadByte()
			} else {
				_, err = c.Read(make([]byte, 1))
			}
			if !errors.Is(err, io.EOF) {
				t.Errorf("idle connection %d: read %v, want the agent to close it", i, err)
			}
			closed <- i
		}()
	}
	var freshErr error
	freshDone := false
	for n := 0; n < len(idle)+1 || !freshDone; {
		select {
		case <-closed:
			n++
		case freshErr = <-fresh:
			freshDone = true
		case <-time.After(20 * time.Millisecond):
		}
		most = max(most, agentConns(t, port))
	}
	if freshErr != nil {
		t.Errorf("a fresh client's GET /status: %v", freshErr)
	}
	if most > maxConns {
		t.Errorf("the agent held %d connections at once, want at most %d", most, maxConns)
	}
	if n := agentConns(t, port); n != 0 {
		t.Errorf("the agent still holds %d connections", n)
	}
	if !strings.Contains(logs.String(), "connection limit reached") {
		t.Errorf("the agent did not log reaching the limit:\n%s", logs.String())
	}
}

// TestWatchOutlivesTheServerTimeouts keeps a /watch stream open longer
// than the server's read and write timeouts and sees a change arrive on
// it; the streams beyond maxWatches are refused with 503 while the
// others stay open.
func TestWatchOutlivesTheServerTimeouts(t *testing.T) {
	t.Parallel()
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	static := writeStatic(t)
	startAgent(t, isolated(t, []string{"--sources=static", "--staticFile=" + static, "--sinks=stdout", "--statusAddr=" + addr})...)
	statusUp(t, addr)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	watch := func() (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/watch", nil)
		return client.Do(req)
	}
	res, err := watch()
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /watch: %v %v", res, err)
	}
	defer res.Body.Close()
	events := make(chan watchEvent, 16)
	go func() {
		defer close(events)
		dec := json.NewDecoder(res.Body)
		for {
			var ev watchEvent
			if dec.Decode(&ev) != nil {
				return
			}
			events <- ev
		}
	}()
	next := func(what string, ok func(watchEvent) bool) {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case ev, open := <-events:
				if !open {
					t.Fatalf("the stream ended while waiting for %s", what)
				}
				if ok(ev) {
					return
				}
			case <-timeout:
				t.Fatalf("no %s on the stream", what)
			}
		}
	}
	next("the static port", func(ev watchEvent) bool {
		return (ev.Event == evCurrent || ev.Event == evAdded) && ev.port() == "tcp 127.0.0.1:8080"
	})

	// The others, up to the limit, are served; one more is refused.
	for i := 1; i < maxWatches; i++ {
		r, err := watch()
		if err != nil || r.StatusCode != http.StatusOK {
			t.Fatalf("watch stream %d: %v %v", i+1, r, err)
		}
		defer r.Body.Close()
	}
	if r, err := watch(); err != nil || r.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("watch stream %d: %v %v, want 503", maxWatches+1, r, err)
	} else {
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		if !strings.Contains(string(body), "too many /watch streams") {
			t.Errorf("the refusal says %q", body)
		}
	}

	// Outlast both timeouts before the change: the stream must still be
	// open and written to.
	time.Sleep(max(readTimeout, writeTimeout) + 2*time.Second)
	writeFile(t, static, `{"mappings":[{"id":"web","ports":[
		{"protocol":"tcp","containerPort":80,"hostIP":"0.0.0.0","hostPort":8080},
		{"protocol":"tcp","containerPort":81,"hostIP":"0.0.0.0","hostPort":8081}]}]}`)
	next("added event for 8081", func(ev watchEvent) bool { return ev.Event == evAdded && ev.port() == "tcp 127.0.0.1:8081" })
}

// TestProfilesAreBounded asks for profiles longer than maxProfileSeconds
// (refused with 400) and for a second timed profile while one runs
// (refused with 429); the one running outlasts the server's read and
// write timeouts.
func TestProfilesAreBounded(t *testing.T) {
	t.Parallel()
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	startAgent(t, isolated(t, []string{"--sources=static", "--staticFile=" + writeStatic(t), "--sinks=stdout", "--statusAddr=" + addr, "--pprof"})...)
	statusUp(t, addr)
	client := &http.Client{Timeout: 2 * time.Minute}
	get := func(path string) (int, string) {
		res, err := client.Get("http://" + addr + path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
			return 0, ""
		}
		defer res.Body.Close()
		body, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(body)
	}
	for _, path := range []string{
		"/debug/pprof/profile?seconds=3600",
		"/debug/pprof/trace?seconds=3600",
		"/debug/pprof/heap?seconds=3600",
		"/debug/pprof/profile?seconds=soon",
		"/debug/pprof/profile?seconds=1.5",
		"/debug/pprof/trace?seconds=-1",
	} {
		if code, body := get(path); code != http.StatusBadRequest || !strings.Contains(body, "at most 60") {
			t.Errorf("GET %s: %d %q, want 400 saying the limit", path, code, body)
		}
	}

	timeouts := max(readTimeout, writeTimeout)
	seconds := int((timeouts + 3*time.Second) / time.Second)
	profile := make(chan []byte, 1)
	go func() {
		code, body := get(fmt.Sprintf("/debug/pprof/profile?seconds=%d", seconds))
		if code != http.StatusOK {
			t.Errorf("the CPU profile: %d %.200q", code, body)
		}
		profile <- []byte(body)
	}()
	// The goroutine dump is no timed profile: it shows when the CPU
	// profile runs without taking its place.
	testenv.Eventually(t, time.Minute, "the CPU profile to run", func() (bool, string) {
		_, body := get("/debug/pprof/goroutine?debug=2")
		return strings.Contains(body, "net/http/pprof.Profile("), "not in the goroutine dump"
	})
	if code, body := get("/debug/pprof/trace?seconds=1"); code != http.StatusTooManyRequests || !strings.Contains(body, "one runs at a time") {
		t.Errorf("a trace while the profile runs: %d %q, want 429", code, body)
	}
	if code, _ := get("/debug/pprof/heap"); code != http.StatusOK {
		t.Errorf("a heap snapshot while the profile runs: %d, want 200", code)
	}
	// Cut short by a timeout, it would end at the timeout or not parse.
	if d := profileDuration(t, <-profile); d <= timeouts+time.Second {
		t.Errorf("the profile covers %s of the %ds asked for", d, seconds)
	}
}

// profileDuration reads duration_nanos (field 10) from a gzipped
// profile.proto.
func profileDuration(t *testing.T, gz []byte) time.Duration {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatalf("the profile is not gzip: %v", err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			break
		}
		b = b[n:]
		switch tag & 7 {
		case 0:
			v, n := binary.Uvarint(b)
			if n <= 0 {
				t.Fatal("bad varint in the profile")
			}
			if tag>>3 == 10 {
				return time.Duration(v)
			}
			b = b[n:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				t.Fatal("bad length in the profile")
			}
			b = b[n+int(l):]
		default:
			t.Fatalf("wire type %d in the profile", tag&7)
		}
	}
	t.Fatal("the profile has no duration")
	return 0
}
