package core_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
)

// forgedRecord is a record of sink "p" that claims 127.0.0.1:6443, a port
// the peer holds for another party exactly as the agent would make it.
const forgedRecord = `{"sink":"p","exposed":[{"claim":{"source":"docker","id":"x"},"port":{"protocol":"tcp","containerPort":6443,"hostIP":"127.0.0.1","hostPort":6443}}]}`

// TestUntrustedRecordIsNotActedOn starts an agent over a record that
// claims a port another party holds on the peer. A record anyone but the
// agent's user could have written (in a directory others may write to,
// writable by others, owned by another user, reached through a link) is
// not read: the port stays, the agent serves its other ports, and says
// once why. The same record, trusted, is acted on.
func TestUntrustedRecordIsNotActedOn(t *testing.T) {
	foreign := tcp("127.0.0.1", 6443)
	cases := []struct {
		name    string
		setup   func(t *testing.T, dir string) // dir: the state directory, holding the record as p.json
		trusted bool
		warning string
	}{
		{name: "trusted", trusted: true},
		{name: "directory others may write to", warning: "writable by group or others", setup: func(t *testing.T, dir string) {
			chmod(t, dir, 0o777|os.ModeSticky)
		}},
		{name: "record others may write to", warning: "writable by group or others", setup: func(t *testing.T, dir string) {
			chmod(t, filepath.Join(dir, "p.json"), 0o666)
		}},
		{name: "record another user owns", warning: "owned by uid 65534", setup: func(t *testing.T, dir string) {
			if err := os.Chown(filepath.Join(dir, "p.json"), 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "record is a link", warning: "symbolic link", setup: func(t *testing.T, dir string) {
			elsewhere := filepath.Join(t.TempDir(), "p.json")
			if err := os.Rename(filepath.Join(dir, "p.json"), elsewhere); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(elsewhere, filepath.Join(dir, "p.json")); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "state directory is a link", warning: "not a directory", setup: func(t *testing.T, dir string) {
			real := filepath.Join(filepath.Dir(dir), "real")
			if err := os.Rename(dir, real); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(real, dir); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "p.json"), []byte(forgedRecord), 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			peer := &listPeer{fakePeer: newFakePeer()}
			peer.hold(foreign, "guest")
			obs, logs := observer.New(zap.InfoLevel)
			cfg := fastConfig()
			cfg.StateDir = dir
			cfg.Log = zap.New(obs)
			h := startRouter(t, cfg, func(r *core.Router) {
				r.AddSink("p", peer, nil)
				r.AddSource("docker", core.SourceFunc(func(ctx context.Context, out core.Emitter) error {
					out.Snapshot([]core.Mapping{mapping("web", 8080)})
					<-ctx.Done()
					return nil
				}))
			})
			if tc.trusted {
				waitState(t, peer.fakePeer, want(mapping("web", 8080)))
				h.stop()
				return
			}
			waitState(t, peer.fakePeer, want(mapping("x", 6443, 8080)))
			testenv.Eventually(t, waitFor, "a reconciled, idle sink", func() (bool, string) {
				st := h.r.Status()
				s := st.Sinks[0]
				return s.Syncs > 0 && s.Pending == 0, fmt.Sprintf("syncs %d, pending %d", s.Syncs, s.Pending)
			})
			h.stop()
			if got := peer.state(); !slices.Contains(got, entry(foreign)) {
				t.Errorf("the agent removed the port another party holds: peer has %q", got)
			}
			var warned []string
			for _, e := range logs.FilterLevelExact(zap.WarnLevel).All() {
				warned = append(warned, fmt.Sprint(e.Message, " ", e.ContextMap()))
			}
			if len(warned) != 1 || !strings.Contains(warned[0], tc.warning) {
				t.Errorf("want one warning saying %q, have %q", tc.warning, warned)
			}
			peer.checkNoViolations(t)
		})
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}
