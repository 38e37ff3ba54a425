package kubernetes_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/internal/testenv"
	"github.com/guestagent/guestagent/sources/kubernetes"
)

// countingSink counts the adds and removes it is sent.
type countingSink struct {
	mu            sync.Mutex
	adds, removes int
}

func (c *countingSink) Send(_ context.Context, ch core.Change) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch.Remove {
		c.removes++
	} else {
		c.adds++
	}
	return nil
}

func (c *countingSink) counts() (int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.adds, c.removes
}

// waitQuiet waits until the sink has seen at least n changes.
func waitQuiet(t *testing.T, c *countingSink, n int) {
	t.Helper()
	testenv.Eventually(t, waitTimeout, fmt.Sprintf("%d deliveries", n), func() (bool, string) {
		a, r := c.counts()
		return a+r >= n, fmt.Sprintf("%d adds and %d removes", a, r)
	})
	time.Sleep(100 * time.Millisecond)
}

// waitTimeout bounds the tests' waits for the source to catch up.
const waitTimeout = 20 * time.Second

// desired describes what the router wants, for the message of a wait that
// times out.
func desired(r *core.Router) string { return fmt.Sprintf("desired %v", r.Desired()) }

// newSource builds a source from cfg, failing t if New refuses it.
func newSource(t testing.TB, cfg kubernetes.Config) *kubernetes.Source {
	t.Helper()
	src, err := kubernetes.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func writeFile(path, s string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func sameSet(a, b string) bool {
	x, y := strings.Fields(a), strings.Fields(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(x, y)
}

func testLogger(t *testing.T) *zap.Logger { return zaptest.NewLogger(t) }
