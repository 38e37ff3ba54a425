package kubernetes_test

import (
	"context"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/guestagent/guestagent/core"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
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
	eventually(t, "deliveries", func() bool { a, r := c.counts(); return a+r >= n })
	time.Sleep(100 * time.Millisecond)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
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
