package core

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// record is the durable list of the ports one sink was sent by this agent
// and still holds: its proof of ownership. A restarted agent (even one that
// was killed) reads it to remove exactly its own leftovers and never
// touches ports other parties hold. It is written atomically (a new file
// renamed over the old), before adds are sent and after changes are
// acknowledged, so it always covers what the peer may hold from the agent.
type record struct {
	path string
	sink string
}

type recordFile struct {
	Sink    string     `json:"sink"`
	Exposed []exposure `json:"exposed"`
}

func newRecord(dir, sink string) *record {
	if dir == "" {
		return nil
	}
	return &record{path: filepath.Join(dir, sink+".json"), sink: sink}
}

// load returns the recorded exposures; a missing file is an empty record.
func (r *record) load() ([]exposure, error) {
	b, err := os.ReadFile(r.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the ownership record: %w", err)
	}
	var f recordFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("ownership record %s is not valid: %w", r.path, err)
	}
	out := f.Exposed[:0]
	for _, e := range f.Exposed {
		if e.Port.Protocol != "" && e.Port.HostPort != 0 {
			out = append(out, e)
		}
	}
	return out, nil
}

// save replaces the record with es.
func (r *record) save(es []exposure) error {
	if es == nil {
		es = []exposure{}
	}
	b, err := json.Marshal(recordFile{Sink: r.sink, Exposed: es})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(r.path), "."+filepath.Base(r.path)+".*")
	if err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	if err := os.Rename(tmp.Name(), r.path); err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	return nil
}
