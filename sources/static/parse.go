package static

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/guestagent/guestagent/core"
)

// File is the JSON document the source reads.
type File struct {
	Mappings []Entry `json:"mappings"`
}

// Entry is one mapping in the file.
type Entry struct {
	ID           string             `json:"id"`
	Ports        []core.Port        `json:"ports"`
	ConnectAddrs []core.ConnectAddr `json:"connectAddrs,omitempty"`
}

// Parse decodes and checks a static file. Unknown fields, duplicate ids and
// invalid ports are errors; protocols are case-insensitive and default to
// tcp.
func Parse(data []byte) ([]core.Mapping, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var f File
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decoding: trailing data after the JSON object")
	}
	seen := make(map[string]bool, len(f.Mappings))
	out := make([]core.Mapping, 0, len(f.Mappings))
	var errs []error
	for i, e := range f.Mappings {
		if e.ID == "" {
			errs = append(errs, fmt.Errorf("mapping %d: id is empty", i))
			continue
		}
		if seen[e.ID] {
			errs = append(errs, fmt.Errorf("mapping %d: id %q used twice", i, e.ID))
			continue
		}
		seen[e.ID] = true
		m := core.Mapping{Key: core.Key{Source: Name, ID: e.ID}, Ports: e.Ports, ConnectAddrs: e.ConnectAddrs}
		for j := range m.Ports {
			p, err := core.ParseProtocol(string(m.Ports[j].Protocol))
			if err != nil {
				errs = append(errs, fmt.Errorf("mapping %q port %d: %w", e.ID, j, err))
				continue
			}
			m.Ports[j].Protocol = p
		}
		if err := m.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, m)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}
