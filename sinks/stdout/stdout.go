// Package stdout is a sink that prints each delivered change as one JSON
// line: the PortMapping wire form plus the source and id it belongs to.
// It needs no peer, which makes it the sink to watch the agent with, and
// has nothing to recover: a line that cannot be written is an error the
// router retries.
package stdout

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/spf13/pflag"

	"github.com/guestagent/guestagent/core"
	"github.com/guestagent/guestagent/registry"
	"github.com/guestagent/guestagent/wire"
)

// Name is the sink's registry name.
const Name = "stdout"

func init() {
	registry.RegisterSink(registry.SinkPlugin{
		Name:    Name,
		Summary: "print every delivered change as a JSON line on standard output",
		Setup: func(*pflag.FlagSet) registry.SinkFactory {
			return func(env registry.Env) (core.Sink, error) {
				return New(Config{Writer: env.Stdout})
			}
		},
	})
}

// Line is the JSON object printed for each change.
type Line struct {
	Source string `json:"source"`
	ID     string `json:"id"`
	wire.PortMapping
}

// Config configures a Sink.
type Config struct {
	// Writer receives the lines; nil writes them to os.Stdout. The agent
	// gives its standard output (registry.Env.Stdout).
	Writer io.Writer
}

// Sink writes changes to a writer. It holds nothing to close: the writer
// is its owner's.
type Sink struct {
	mu  sync.Mutex // serializes the lines
	enc *json.Encoder
}

// New returns a Sink that writes to cfg.Writer; it never fails.
func New(cfg Config) (*Sink, error) {
	w := cfg.Writer
	if w == nil {
		w = os.Stdout
	}
	return &Sink{enc: json.NewEncoder(w)}, nil
}

// Send prints c as one line.
func (s *Sink) Send(ctx context.Context, c core.Change) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.enc.Encode(Line{Source: c.Mapping.Source, ID: c.Mapping.ID, PortMapping: wire.FromChange(c)}); err != nil {
		return fmt.Errorf("writing change: %w", err)
	}
	return nil
}

// Interface guards.
var (
	_ core.Sink = (*Sink)(nil)
)
