// Package dockerdtest runs a real dockerd for tests: Debian's docker.io,
// started by Start in a network namespace of its own (gadocker-<pid>), so
// that its bridge, its NAT rules and the ports it publishes stay out of
// the machine's own tables, with a private socket, data root and exec
// root under the directory it is given. It needs root and dockerd, docker,
// nsenter and go on PATH; Start returns an error saying what is missing.
//
// The daemon runs with --live-restore, its default bridge on
// 198.18.0.1/22 and its other networks from 198.18.64.0/18, all in the
// benchmarking range. Start builds the static test web server
// (testdata/webserver: it answers HTTP on port 80 with the container's
// hostname) and imports it as WebImage, so that no test pulls an image.
//
// A package's tests share one daemon, started on first use and stopped by
// TestMain, as sources/docker does:
//
//	var engine = testenv.NewShared("dockerd", dockerdtest.Start, (*dockerdtest.Dockerd).Close)
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		engine.Close()
//		os.Exit(code)
//	}
//
//	func TestSomething(t *testing.T) {
//		d := engine.Get(t) // skips under -short, or when dockerd cannot run
//		id, err := d.Docker("run", "-d", "-p", "127.0.0.1:8080:80", dockerdtest.WebImage)
//		...
//	}
//
// iptables commands for the daemon's rules run in d.Netns, through
// testenv.IptablesWrapper or testenv.NatRules. Stop, Start and Kill take the
// daemon down and up again for outage and crash tests; containers keep
// running meanwhile.
package dockerdtest

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/guestagent/guestagent/internal/testenv"
)

// WebImage is the image Start builds: the static test web server.
const WebImage = "guestagent-test/web:latest"

// Dockerd is a dockerd from Debian's docker.io, run inside its own network
// namespace (so its bridge and NAT rules stay there) with private socket
// and state directories.
type Dockerd struct {
	// Netns is the name of the daemon's network namespace (under
	// /var/run/netns).
	Netns string
	// Dir holds the daemon's socket, state and log (dockerd.log).
	Dir string
	// Host is the DOCKER_HOST of the daemon's socket.
	Host string

	cleanupNetns func()
	cmd          *exec.Cmd
	exited       chan struct{}
}

// Start starts a daemon under dir, waits until it answers and builds
// WebImage in it. Close stops it and removes what it made.
func Start(dir string) (*Dockerd, error) {
	for _, bin := range []string{"dockerd", "docker", "nsenter", "go"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s not found: %w", bin, err)
		}
	}
	ns := fmt.Sprintf("gadocker-%d", os.Getpid())
	cleanup, err := testenv.NewNetns(ns)
	if err != nil {
		return nil, err
	}
	d := &Dockerd{Netns: ns, Dir: dir, Host: "unix://" + filepath.Join(dir, "docker.sock"), cleanupNetns: cleanup}
	if err := d.Start(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.buildImage(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// Start starts the daemon (again) and waits until it answers.
func (d *Dockerd) Start() error {
	log, err := os.OpenFile(filepath.Join(d.Dir, "dockerd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	argv := testenv.InNetns(d.Netns, "dockerd",
		"-H", d.Host,
		"--data-root", filepath.Join(d.Dir, "root"),
		"--exec-root", filepath.Join(d.Dir, "exec"),
		"--pidfile", filepath.Join(d.Dir, "dockerd.pid"),
		"--bip", "198.18.0.1/22", // room for the burst benchmark's 500 containers
		"--default-address-pool", "base=198.18.64.0/18,size=24",
		"--live-restore")
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = log, log
	if err := d.cmd.Start(); err != nil {
		return fmt.Errorf("starting dockerd: %w", err)
	}
	d.exited = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(d.cmd, d.exited)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := d.Docker("version", "--format", "{{.Server.APIVersion}}"); err == nil {
			return nil
		}
		select {
		case <-d.exited:
			out, _ := os.ReadFile(filepath.Join(d.Dir, "dockerd.log"))
			return fmt.Errorf("dockerd exited during start-up:\n%s", tail(out))
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("dockerd did not answer within 60s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop stops the daemon with SIGTERM and waits for it.
func (d *Dockerd) Stop() { d.stop(syscall.SIGTERM) }

// Kill kills the daemon and the containerd it started with SIGKILL, as a
// crash would, and waits for the daemon. Containers keep running under
// their shims (the daemon runs with --live-restore).
func (d *Dockerd) Kill() {
	d.stop(syscall.SIGKILL)
	pidFile := filepath.Join(d.Dir, "exec", "containerd", "containerd.pid")
	pid, err := os.ReadFile(pidFile)
	if err != nil {
		return
	}
	if n, err := strconv.Atoi(strings.TrimSpace(string(pid))); err == nil && n > 1 {
		_ = syscall.Kill(n, syscall.SIGKILL)
	}
	// Where PID 1 does not reap orphans the killed containerd stays a
	// zombie, which a restarted dockerd would take for a live one.
	_ = os.Remove(pidFile)
}

func (d *Dockerd) stop(sig syscall.Signal) {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	d.cmd = nil
}

// Close removes every container, stops the daemon and deletes its
// namespace and state.
func (d *Dockerd) Close() {
	if d.cmd != nil {
		if ids, err := d.Docker("ps", "-aq"); err == nil {
			_ = d.RemoveAll(strings.Fields(ids))
		}
	}
	d.Stop()
	// The daemon runs with --live-restore: containers it failed to remove
	// would outlive it, so their shims and processes are killed.
	testenv.KillShims(filepath.Join(d.Dir, "exec"))
	nsFiles, _ := filepath.Glob(filepath.Join(d.Dir, "exec", "netns", "*"))
	for _, f := range nsFiles {
		_ = exec.Command("umount", f).Run() // the namespaces of killed containers
	}
	_ = exec.Command("umount", "-R", filepath.Join(d.Dir, "root")).Run()
	_ = exec.Command("umount", "-R", filepath.Join(d.Dir, "exec")).Run()
	d.cleanupNetns()
}

// RemoveAll force-removes the named containers, ten to a command and
// eight commands at a time, so that hundreds of them are gone within the
// time one command may take. It returns the first error.
func (d *Dockerd) RemoveAll(names []string) error {
	return testenv.ForEach(8, slices.Collect(slices.Chunk(names, 10)), func(batch []string) error {
		_, err := d.Docker(append([]string{"rm", "-f"}, batch...)...)
		return err
	})
}

// Docker runs the docker CLI against the daemon.
func (d *Dockerd) Docker(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+d.Host)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

// buildImage compiles the test web server and imports it as WebImage.
func (d *Dockerd) buildImage() error {
	bin, err := testenv.BuildWebServer(d.Dir)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "web", Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := tw.Write(data); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	cmd := exec.Command("docker", "import", "-c", `ENTRYPOINT ["/web"]`, "-c", "EXPOSE 80", "-", WebImage)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+d.Host)
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("docker import: %w: %s", err, out)
	}
	return nil
}

func tail(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}
