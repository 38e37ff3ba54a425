// Package containerdtest runs a real containerd for tests and drives
// containers in it through containerd's Go client. StartContainerd runs
// Debian's containerd with a private socket, root and state directory
// under the directory it is given, with the CRI plugin off; it needs root
// and containerd, containerd-shim-runc-v2, runc and go on PATH, and returns
// an error saying what is missing. The static test web server
// (testdata/webserver) is packed as ContainerdImage and imported into each
// namespace a test uses, so that no test pulls an image.
//
// A package's tests share one containerd, started on first use and
// stopped by TestMain, as sources/containerd does:
//
//	var engine = testenv.NewShared("containerd", containerdtest.StartContainerd, (*containerdtest.Containerd).Close)
//
// and engine.Get(t) in each test (it skips under -short, or when
// containerd cannot run). RunContainer, StopContainer, RemoveContainer and
// SetLabels make the events the containerd source follows; Stop, Start and
// Kill take containerd down and up again while tasks keep running under
// their shims.
package containerdtest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/guestagent/guestagent/internal/testenv"
)

// ContainerdImage is the image StartContainerd imports in every namespace
// the tests use: the static test web server.
const ContainerdImage = "docker.io/guestagent-test/web:latest"

// Containerd is Debian's containerd run with a private socket, root and
// state directory.
type Containerd struct {
	// Dir holds containerd's config, root, state and log (containerd.log).
	Dir string
	// Socket is the path of containerd's gRPC socket.
	Socket string
	// Client is connected to containerd while it runs (nil after Stop).
	Client *containerd.Client

	cmd    *exec.Cmd
	exited chan struct{}
	image  []byte // the OCI archive, imported per namespace
}

// StartContainerd starts containerd under dir and waits until it serves.
// Close stops it and removes every container it has.
func StartContainerd(dir string) (*Containerd, error) {
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "runc", "go"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s not found: %w", bin, err)
		}
	}
	c := &Containerd{Dir: dir, Socket: filepath.Join(dir, "containerd.sock")}
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.Socket, c.Socket+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(config), 0o644); err != nil {
		return nil, err
	}
	if err := c.Start(); err != nil {
		c.Close()
		return nil, err
	}
	bin, err := testenv.BuildWebServer(dir)
	if err != nil {
		c.Close()
		return nil, err
	}
	if c.image, err = ociArchive(bin); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Start starts containerd (again) and connects Client.
func (c *Containerd) Start() error {
	log, err := os.OpenFile(filepath.Join(c.Dir, "containerd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	c.cmd = exec.Command("containerd", "--config", filepath.Join(c.Dir, "config.toml"))
	c.cmd.Stdout, c.cmd.Stderr = log, log
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("starting containerd: %w", err)
	}
	c.exited = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(c.cmd, c.exited)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(c.Socket); err == nil {
			cli, err := containerd.New(c.Socket, containerd.WithTimeout(2*time.Second))
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				ok, _ := cli.IsServing(ctx)
				cancel()
				if ok {
					c.Client = cli
					return nil
				}
				cli.Close()
			}
		}
		select {
		case <-c.exited:
			out, _ := os.ReadFile(filepath.Join(c.Dir, "containerd.log"))
			return fmt.Errorf("containerd exited during start-up:\n%s", out)
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("containerd did not serve within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops containerd with SIGTERM. Running tasks keep running under
// their shims, as in a real daemon restart.
func (c *Containerd) Stop() { c.stop(syscall.SIGTERM) }

// Kill kills containerd with SIGKILL, as a crash would; tasks keep running
// under their shims.
func (c *Containerd) Kill() { c.stop(syscall.SIGKILL) }

func (c *Containerd) stop(sig syscall.Signal) {
	if c.Client != nil {
		c.Client.Close()
		c.Client = nil
	}
	if c.cmd == nil {
		return
	}
	_ = c.cmd.Process.Signal(sig)
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
	c.cmd = nil
}

// Close removes every container of every namespace and stops containerd.
func (c *Containerd) Close() {
	if c.Client != nil {
		ctx := context.Background()
		nss, _ := c.Client.NamespaceService().List(ctx)
		for _, ns := range nss {
			nctx := namespaces.WithNamespace(ctx, ns)
			ctrs, _ := c.Client.Containers(nctx)
			for _, ctr := range ctrs {
				_ = c.RemoveContainer(ns, ctr.ID())
			}
		}
	}
	c.Stop()
	_ = exec.Command("umount", "-R", filepath.Join(c.Dir, "root")).Run()
}

// Pull imports the test image into namespace ns.
func (c *Containerd) Pull(ns string) (containerd.Image, error) {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	if img, err := c.Client.GetImage(ctx, ContainerdImage); err == nil {
		return img, nil
	}
	imgs, err := c.Client.Import(ctx, bytes.NewReader(c.image))
	if err != nil {
		return nil, fmt.Errorf("importing the test image: %w", err)
	}
	if len(imgs) == 0 {
		return nil, errors.New("importing the test image: nothing imported")
	}
	img := containerd.NewImage(c.Client, imgs[0])
	if err := img.Unpack(ctx, "overlayfs"); err != nil {
		return nil, fmt.Errorf("unpacking the test image: %w", err)
	}
	return img, nil
}

// RunContainer creates and starts a container of the test image in
// namespace ns with labels. netns, when set, is the network namespace path
// the task joins (the default is a new, empty one).
func (c *Containerd) RunContainer(ns, id string, labels map[string]string, netns string) error {
	img, err := c.Pull(ns)
	if err != nil {
		return err
	}
	ctx := namespaces.WithNamespace(context.Background(), ns)
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if netns != "" {
		specOpts = append(specOpts, oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: netns}))
	}
	ctr, err := c.Client.NewContainer(ctx, id,
		containerd.WithNewSnapshot(id+"-snapshot", img),
		containerd.WithNewSpec(specOpts...),
		containerd.WithContainerLabels(labels))
	if err != nil {
		return fmt.Errorf("creating container %s: %w", id, err)
	}
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		return fmt.Errorf("creating task %s: %w", id, err)
	}
	if err := task.Start(ctx); err != nil {
		return fmt.Errorf("starting task %s: %w", id, err)
	}
	return nil
}

// StopContainer kills a container's task and deletes the task, leaving
// the container.
func (c *Containerd) StopContainer(ns, id string) error {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	ctr, err := c.Client.LoadContainer(ctx, id)
	if err != nil {
		return err
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		return err
	}
	wait, err := task.Wait(ctx)
	if err != nil {
		return err
	}
	if err := task.Kill(ctx, syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case <-wait:
	case <-time.After(30 * time.Second):
		return fmt.Errorf("task %s did not exit", id)
	}
	_, err = task.Delete(ctx)
	return err
}

// RemoveContainer stops (if needed) and deletes a container.
func (c *Containerd) RemoveContainer(ns, id string) error {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	ctr, err := c.Client.LoadContainer(ctx, id)
	if err != nil {
		return err
	}
	if task, err := ctr.Task(ctx, nil); err == nil {
		_, _ = task.Delete(ctx, containerd.WithProcessKill)
	}
	return ctr.Delete(ctx, containerd.WithSnapshotCleanup)
}

// SetLabels replaces a container's labels (a /containers/update event).
func (c *Containerd) SetLabels(ns, id string, labels map[string]string) error {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	ctr, err := c.Client.LoadContainer(ctx, id)
	if err != nil {
		return err
	}
	_, err = ctr.SetLabels(ctx, labels)
	return err
}

// ociArchive packs the binary at bin as a one-layer OCI image archive whose
// entrypoint runs it.
func ociArchive(bin string) ([]byte, error) {
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	if err := tw.WriteHeader(&tar.Header{Name: "web", Mode: 0o755, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	blobs := map[string][]byte{}
	add := func(b []byte) (string, int) {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return d, len(b)
	}
	layerDigest, layerSize := add(layer.Bytes())
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Entrypoint": []string{"/web"}, "ExposedPorts": map[string]any{"80/tcp": map[string]any{}}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	configDigest, configSize := add(config)
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": configDigest, "size": configSize},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layerDigest, "size": layerSize}},
	})
	manifestDigest, manifestSize := add(manifest)
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []any{map[string]any{
			"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifestDigest, "size": manifestSize,
			"annotations": map[string]string{"io.containerd.image.name": ContainerdImage, "org.opencontainers.image.ref.name": "latest"},
		}},
	})
	var out bytes.Buffer
	aw := tar.NewWriter(&out)
	write := func(name string, b []byte) error {
		if err := aw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := aw.Write(b)
		return err
	}
	if err := write("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return nil, err
	}
	if err := write("index.json", index); err != nil {
		return nil, err
	}
	for d, b := range blobs {
		if err := write("blobs/sha256/"+d[len("sha256:"):], b); err != nil {
			return nil, err
		}
	}
	if err := aw.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
