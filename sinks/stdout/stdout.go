// Package stdout is a sink that prints each delivered change as one JSON
// line: the PortMapping wire form plus the source and id it belongs to.
// It needs no peer, which makes it the sink to watch the agent with.
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
				if env.Stdout == nil {
					return New(os.Stdout), nil
				}
				return New(env.Stdout), nil
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

// Sink writes changes to a writer.
type Sink struct {
	mu  sync.Mutex
	enc *json.Encoder
}

// New returns a Sink that writes to w.
func New(w io.Writer) *Sink { return &Sink{enc: json.NewEncoder(w)} }

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
