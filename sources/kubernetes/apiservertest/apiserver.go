// Package apiservertest runs a real kube-apiserver (built from the
// k8s.io/kubernetes module, see the Makefile) on loopback, with Debian's
// etcd as its store, for integration tests.
package apiservertest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	k8s "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// BinaryEnv names the kube-apiserver binary.
const BinaryEnv = "GUESTAGENT_KUBE_APISERVER"

const token = "guestagent-test-token"

// Server is an etcd and a kube-apiserver.
type Server struct {
	Dir string
	// Kubeconfig is the path of a kubeconfig for the server.
	Kubeconfig string
	Client     *k8s.Clientset

	bin               string
	etcdPort, apiPort int
	peerPort          int
	etcd, api         *exec.Cmd
	etcdDone, apiDone chan struct{}
	generation        int
}

// Start starts etcd and kube-apiserver under dir and waits until the API
// server is ready.
func Start(dir string) (*Server, error) {
	bin := os.Getenv(BinaryEnv)
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("kube-apiserver"); err != nil {
			return nil, fmt.Errorf("kube-apiserver not found (set %s)", BinaryEnv)
		}
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("kube-apiserver: %w", err)
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		return nil, fmt.Errorf("etcd not found: %w", err)
	}
	s := &Server{Dir: dir, bin: bin, Kubeconfig: filepath.Join(dir, "kubeconfig")}
	var err error
	for _, p := range []*int{&s.etcdPort, &s.peerPort, &s.apiPort} {
		if *p, err = freePort(); err != nil {
			return nil, err
		}
	}
	if err := s.writeFiles(); err != nil {
		return nil, err
	}
	if err := s.Start(); err != nil {
		s.Stop()
		return nil, err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", s.Kubeconfig)
	if err != nil {
		s.Stop()
		return nil, err
	}
	if s.Client, err = k8s.NewForConfig(cfg); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *Server) writeFiles() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	priv := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	files := map[string][]byte{
		"sa.key":     priv,
		"sa.pub":     pub,
		"tokens.csv": []byte(token + `,admin,1,"system:masters"` + "\n"),
		"kubeconfig": fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:%d
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: %s
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, s.apiPort, token),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(s.Dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// Start starts etcd and the API server (again, after Stop or Reset).
func (s *Server) Start() error {
	log, err := os.OpenFile(filepath.Join(s.Dir, "server.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	data := filepath.Join(s.Dir, fmt.Sprintf("etcd-%d", s.generation))
	s.etcd = exec.Command("etcd", "--data-dir", data,
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", s.etcdPort),
		"--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", s.etcdPort),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", s.peerPort),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", s.peerPort),
		"--initial-cluster", fmt.Sprintf("default=http://127.0.0.1:%d", s.peerPort))
	s.etcd.Stdout, s.etcd.Stderr = log, log
	if err := s.etcd.Start(); err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	s.etcdDone = waitChan(s.etcd)
	s.api = exec.Command(s.bin,
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", s.etcdPort),
		"--bind-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(s.apiPort),
		"--cert-dir", filepath.Join(s.Dir, "certs"),
		"--service-account-key-file", filepath.Join(s.Dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(s.Dir, "sa.key"),
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--token-auth-file", filepath.Join(s.Dir, "tokens.csv"),
		"--authorization-mode", "AlwaysAllow",
		"--service-cluster-ip-range", "198.18.192.0/20",
		"--enable-priority-and-fairness=false")
	s.api.Stdout, s.api.Stderr = log, log
	if err := s.api.Start(); err != nil {
		return fmt.Errorf("starting kube-apiserver: %w", err)
	}
	s.apiDone = waitChan(s.api)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		Proxy:           nil,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // a test server on loopback with a throwaway certificate
	}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(90 * time.Second)
	for {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("https://127.0.0.1:%d/readyz", s.apiPort), nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if res, err := client.Do(req); err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-s.apiDone:
			out, _ := os.ReadFile(filepath.Join(s.Dir, "server.log"))
			if len(out) > 4000 {
				out = out[len(out)-4000:]
			}
			return fmt.Errorf("kube-apiserver exited during start-up:\n%s", out)
		case <-s.etcdDone:
			return errors.New("etcd exited during start-up")
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("kube-apiserver not ready within 90s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func waitChan(cmd *exec.Cmd) chan struct{} {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	return done
}

func stop(cmd *exec.Cmd, done chan struct{}, sig syscall.Signal) {
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Stop stops the API server and etcd.
func (s *Server) Stop() { s.stop(syscall.SIGTERM) }

// Kill kills the API server and etcd with SIGKILL, as a crash would; Start
// brings them back with the same store.
func (s *Server) Kill() { s.stop(syscall.SIGKILL) }

func (s *Server) stop(sig syscall.Signal) {
	stop(s.api, s.apiDone, sig)
	stop(s.etcd, s.etcdDone, sig)
	s.api, s.etcd = nil, nil
}

// Reset stops everything and starts over with an empty store: a new
// cluster behind the same kubeconfig.
func (s *Server) Reset() error {
	s.Stop()
	s.generation++
	return s.Start()
}
