package core

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
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

	// What the last successful save wrote, so that a save of the same
	// content (the acknowledgements of a batch whose adds all succeeded
	// repeat its intent) is skipped. buf is reused between saves.
	lastLen  int
	lastHash uint64
	buf      []byte
}

// plainJSON marks the bytes encoding/json writes as they are in a
// string: printable ASCII but for the quote, the backslash and the HTML
// characters it escapes.
var plainJSON = func() (t [256]bool) {
	for c := 0x20; c < 0x7f; c++ {
		t[c] = true
	}
	for _, c := range `"\<>&` {
		t[c] = false
	}
	return t
}()

// recordSeed seeds the hash that tells a save of unchanged content.
var recordSeed = maphash.MakeSeed()

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

// save replaces the record with es. The record is rewritten whole at
// every change, so its encoding is written out by hand (appendRecord)
// rather than through reflection, and content identical to the last
// save is not written again. Saves must not run concurrently (one
// worker owns the record).
func (r *record) save(es []exposure) error {
	b := appendRecord(r.buf[:0], r.sink, es)
	r.buf = b
	h := maphash.Bytes(recordSeed, b)
	if len(b) == r.lastLen && h == r.lastHash {
		return nil
	}
	if err := r.write(b); err != nil {
		r.lastLen, r.lastHash = 0, 0
		return err
	}
	r.lastLen, r.lastHash = len(b), h
	return nil
}

// write replaces the file with b, atomically.
func (r *record) write(b []byte) error {
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

// appendRecord appends the JSON of recordFile{sink, es} to b: the same
// bytes json.Marshal produces for it.
func appendRecord(b []byte, sink string, es []exposure) []byte {
	b = append(b, `{"sink":`...)
	b = appendJSONString(b, sink)
	b = append(b, `,"exposed":[`...)
	for i, e := range es {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"claim":{"source":`...)
		b = appendJSONString(b, e.Claim.Source)
		b = append(b, `,"id":`...)
		b = appendJSONString(b, e.Claim.ID)
		b = append(b, `},"port":{"protocol":`...)
		b = appendJSONString(b, string(e.Port.Protocol))
		b = append(b, `,"containerPort":`...)
		b = strconv.AppendUint(b, uint64(e.Port.ContainerPort), 10)
		b = append(b, `,"hostIP":`...)
		if e.Port.HostIP.Zone() == "" {
			b = append(b, '"')
			b = e.Port.HostIP.AppendTo(b) // digits, dots, colons and hex: nothing to escape
			b = append(b, '"')
		} else {
			b = appendJSONString(b, e.Port.HostIP.String())
		}
		b = append(b, `,"hostPort":`...)
		b = strconv.AppendUint(b, uint64(e.Port.HostPort), 10)
		b = append(b, '}')
		if len(e.ConnectAddrs) > 0 {
			b = append(b, `,"connectAddrs":[`...)
			for j, c := range e.ConnectAddrs {
				if j > 0 {
					b = append(b, ',')
				}
				b = append(b, `{"network":`...)
				b = appendJSONString(b, c.Network)
				b = append(b, `,"addr":`...)
				b = appendJSONString(b, c.Addr)
				b = append(b, '}')
			}
			b = append(b, ']')
		}
		b = append(b, '}')
	}
	return append(b, "]}"...)
}

// appendJSONString appends s as encoding/json writes it: as is when it
// holds only printable ASCII that needs no escape, through json.Marshal
// otherwise (ids and names rarely need it).
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if !plainJSON[s[i]] {
			q, _ := json.Marshal(s) // a string always marshals
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
