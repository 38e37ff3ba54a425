package core

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// record is a sink's ownership record: the durable list of the ports the
// sink was sent by this agent and still holds, its proof of ownership
// (which sources claim which host ports is the ledger, in claims.go). A restarted agent (even one that
// was killed) reads it to remove exactly its own leftovers and never
// touches ports other parties hold. It is written before adds are sent and
// after changes are acknowledged, so it always covers what the peer may
// hold from the agent.
//
// It lives in two files: the base, <sink>.json, a whole list written
// atomically (a new file renamed over the old), and the journal,
// <sink>.journal, to which each change of the list appends one line, so
// that a batch costs what it changes, not what the sink holds. A journal
// line is written with one write: a write torn by a crash leaves a last
// line without its newline, which loading ignores (the adds it recorded
// were not sent yet). When the journal outgrows the base, the list is
// compacted: a new base is written, then a new journal replaces the old.
// Both carry a generation (a random number each compaction draws anew), and
// a journal is replayed only over the base of its generation: one from
// before an interrupted compaction (already in the new base), or one a
// base written without it outdates, is not replayed again.
//
// A record belongs to one goroutine at a time (its sink's worker, then the
// drain), which keeps its own copy of what the files say and holds no file
// open between writes; it never needs the router's lock.
type record struct {
	path    string // the base
	journal string
	sink    string

	held       map[sinkKey]exposure // what base and journal say together
	gen        uint64               // the generation of the base
	appendable bool                 // the journal continues the base and ends with a whole line
	stale      bool                 // the files lag behind held: the next apply compacts

	journalSize, baseSize int64
	buf                   []byte
	removed               []Port

	failing bool      // the last write failed
	retryAt time.Time // while failing: no write before this
}

// Bounds of what load accepts: a record over them is not read at all (its
// ports cannot be removed, which the agent says), so that a damaged or
// forged one cannot stall the start or exhaust memory. A sink's peer
// holds at most a few ports per host port and protocol; 2^17 entries is
// twice every TCP and UDP port on one address.
const (
	maxRecordBytes   = 32 << 20
	maxRecordEntries = 1 << 17
)

// failedWriteWait is how long a record whose write failed waits before it
// tries again (a full rewrite); the ports change meanwhile in memory.
const failedWriteWait = 5 * time.Second

// compactMin is the size the journal may reach before a compaction
// whatever the size of the base.
const compactMin = 64 << 10

// recordOp is one key's entry in the record: held with exp, or gone.
type recordOp struct {
	key  sinkKey
	exp  exposure
	held bool
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

// recordFile is the base. Generation is absent in bases written before
// the journal existed (and by versions that do not know it), which then
// have no journal to replay.
type recordFile struct {
	Sink       string     `json:"sink"`
	Generation uint64     `json:"generation,omitempty"`
	Exposed    []exposure `json:"exposed"`
}

// journalLine is one line of the journal: the header (sink and
// generation; the first line), or one change of the list.
type journalLine struct {
	Sink       string     `json:"sink,omitempty"`
	Generation uint64     `json:"generation,omitempty"`
	Add        []exposure `json:"add,omitempty"`
	Remove     []Port     `json:"remove,omitempty"`
}

func newRecord(dir, sink string) *record {
	if dir == "" {
		return nil
	}
	return &record{
		path:    filepath.Join(dir, sink+".json"),
		journal: filepath.Join(dir, sink+".journal"),
		sink:    sink,
		held:    map[sinkKey]exposure{},
	}
}

// load reads the record, keying its entries with key, and returns what
// it holds; missing files are an empty record. log notes a torn last
// journal line and a journal that is not replayed.
func (r *record) load(key func(Port) sinkKey, log *zap.Logger) ([]exposure, error) {
	clear(r.held)
	r.gen, r.appendable, r.stale = 0, false, false
	r.journalSize, r.baseSize = 0, 0
	r.removeTemps()
	skipped := 0
	b, err := readRecordFile(r.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		var f recordFile
		if err := json.Unmarshal(b, &f); err != nil {
			return nil, fmt.Errorf("ownership record %s is not valid: %w", r.path, err)
		}
		if f.Sink != r.sink {
			return nil, fmt.Errorf("ownership record %s is sink %q's, not %q's", r.path, f.Sink, r.sink)
		}
		if len(f.Exposed) > maxRecordEntries {
			return nil, fmt.Errorf("ownership record %s holds %d entries, more than the %d a sink can hold", r.path, len(f.Exposed), maxRecordEntries)
		}
		r.gen, r.baseSize = f.Generation, int64(len(b))
		for _, e := range f.Exposed {
			if validEntry(e) {
				r.held[key(e.Port)] = e
			} else {
				skipped++
			}
		}
	}
	n, err := r.replay(key, log)
	if err != nil {
		clear(r.held)
		return nil, err
	}
	if skipped += n; skipped > 0 {
		log.Warn("ignoring ownership record entries this agent cannot have written", zap.String("path", r.path), zap.Int("entries", skipped))
		r.stale = true
	}
	if len(r.held) > maxRecordEntries {
		clear(r.held)
		return nil, fmt.Errorf("ownership journal %s brings the record to more than the %d entries a sink can hold", r.journal, maxRecordEntries)
	}
	return slices.Collect(func(yield func(exposure) bool) {
		for _, e := range r.held {
			if !yield(e) {
				return
			}
		}
	}), nil
}

// replay applies the journal to held when it continues the base, and
// returns how many of its entries were not valid (and left out).
func (r *record) replay(key func(Port) sinkKey, log *zap.Logger) (int, error) {
	b, err := readRecordFile(r.journal)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	size := int64(len(b))
	var lines [][]byte
	for len(b) > 0 {
		line, rest, ok := bytes.Cut(b, []byte{'\n'})
		if !ok {
			log.Warn("ignoring the torn last line of the ownership journal (the agent stopped while writing it)", zap.String("path", r.journal), zap.Int("bytes", len(line)))
			r.stale = true
			break
		}
		lines = append(lines, line)
		b = rest
	}
	var parsed []journalLine
	for i, line := range lines {
		var l journalLine
		if err := json.Unmarshal(line, &l); err != nil {
			if i == len(lines)-1 {
				log.Warn("ignoring the unreadable last line of the ownership journal", zap.String("path", r.journal), zap.Error(err))
				r.stale = true
				break
			}
			return 0, fmt.Errorf("ownership journal %s line %d is not valid: %w", r.journal, i+1, err)
		}
		if i == 0 && l.Generation == 0 {
			return 0, fmt.Errorf("ownership journal %s has no header", r.journal)
		}
		if i == 0 && l.Sink != r.sink {
			return 0, fmt.Errorf("ownership journal %s is sink %q's, not %q's", r.journal, l.Sink, r.sink)
		}
		parsed = append(parsed, l)
	}
	if len(parsed) == 0 {
		r.stale = true
		return 0, nil
	}
	if g := parsed[0].Generation; g != r.gen {
		// The base was written after this journal began (a compaction
		// that stopped before it replaced the journal, or a version that
		// writes the base alone): the base has it all.
		log.Info("ownership journal not replayed: the base record is newer", zap.String("path", r.journal), zap.Uint64("journal_generation", g), zap.Uint64("base_generation", r.gen))
		r.stale = true
		return 0, nil
	}
	skipped := 0
	for _, l := range parsed[1:] {
		for _, p := range l.Remove {
			delete(r.held, key(p))
		}
		for _, e := range l.Add {
			if validEntry(e) {
				r.held[key(e.Port)] = e
			} else {
				skipped++
			}
		}
	}
	r.appendable = !r.stale
	r.journalSize = size
	return skipped, nil
}

// validEntry reports whether e is an entry this agent writes: a known
// protocol and a host port of a named claim, with connect addresses that
// name a network and an address. Anything else was not written by the
// agent, and is never acted on.
func validEntry(e exposure) bool {
	switch e.Port.Protocol {
	case TCP, UDP, SCTP:
	default:
		return false
	}
	if e.Port.HostPort == 0 || e.Claim.Source == "" {
		return false
	}
	for _, c := range e.ConnectAddrs {
		if c.Network == "" || c.Addr == "" {
			return false
		}
	}
	return true
}

// readRecordFile reads a file of the record: a regular file (not a
// link, a FIFO or a device, which are never opened as one), owned by the
// agent's user, writable by no one else, of at most maxRecordBytes.
func readRecordFile(path string) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil, fs.ErrNotExist
	case errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("ownership record %s is a symbolic link; not following it", path)
	case err != nil:
		return nil, fmt.Errorf("reading the ownership record: %w", &fs.PathError{Op: "open", Path: path, Err: err})
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	size, err := trusted(f, path, false)
	if err != nil {
		return nil, err
	}
	if size > maxRecordBytes {
		return nil, fmt.Errorf("ownership record %s is larger than %d MiB", path, maxRecordBytes>>20)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxRecordBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading the ownership record: %w", err)
	}
	if len(b) > maxRecordBytes {
		return nil, fmt.Errorf("ownership record %s is larger than %d MiB", path, maxRecordBytes>>20)
	}
	return b, nil
}

// trusted checks that f (at path) is a regular file (a directory when
// dir), owned by the agent's user and writable by no other, and returns
// its size.
func trusted(f *os.File, path string, dir bool) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	kind := uint32(unix.S_IFREG)
	if dir {
		kind = unix.S_IFDIR
	}
	switch {
	case st.Mode&unix.S_IFMT != kind && dir:
		return 0, fmt.Errorf("%s is not a directory", path)
	case st.Mode&unix.S_IFMT != kind:
		return 0, fmt.Errorf("ownership record %s is not a regular file", path)
	case int(st.Uid) != os.Geteuid():
		return 0, fmt.Errorf("%s is owned by uid %d, not by the agent's (%d)", path, st.Uid, os.Geteuid())
	case st.Mode&0o022 != 0:
		return 0, fmt.Errorf("%s is writable by group or others (mode %04o)", path, st.Mode&0o7777)
	}
	return st.Size, nil
}

// prepareStateDir makes dir, the directory of the records, when it is
// missing (0700), and checks that only the agent can change what is in
// it: a real directory (not a link), owned by the agent's user and
// writable by no other.
func prepareStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("%s is not a directory (a link is not followed)", dir)
		}
		return &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	f := os.NewFile(uintptr(fd), dir)
	defer f.Close()
	_, err = trusted(f, dir, true)
	return err
}

// removeTemps removes the temporary files of writes a killed agent left.
func (r *record) removeTemps() {
	ents, err := os.ReadDir(filepath.Dir(r.path))
	if err != nil {
		return
	}
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, "."+filepath.Base(r.path)+".") || strings.HasPrefix(n, "."+filepath.Base(r.journal)+".") {
			_ = os.Remove(filepath.Join(filepath.Dir(r.path), n))
		}
	}
}

// apply records ops (one per key at most): a journal line of the entries
// that differ from what the record holds, written at once; nothing when
// none differs. full means ops list every held entry: the others are
// removed. A failed write leaves the record stale, and the next apply
// rewrites it whole.
func (r *record) apply(ops []recordOp, full bool) error {
	var keep map[sinkKey]bool
	if full {
		keep = make(map[sinkKey]bool, len(ops))
	}
	b := append(r.buf[:0], '{')
	adds := 0
	removed := r.removed[:0]
	for _, op := range ops {
		cur, had := r.held[op.key]
		if full {
			keep[op.key] = true
		}
		switch {
		case op.held && had && identical(cur, op.exp):
		case op.held:
			r.held[op.key] = op.exp
			if adds == 0 {
				b = append(b, `"add":[`...)
			} else {
				b = append(b, ',')
			}
			b = appendExposure(b, op.exp)
			adds++
		case had:
			delete(r.held, op.key)
			removed = append(removed, cur.Port)
		}
	}
	if full {
		for k, e := range r.held {
			if !keep[k] {
				delete(r.held, k)
				removed = append(removed, e.Port)
			}
		}
	}
	for i, p := range removed {
		switch {
		case i > 0:
			b = append(b, ',')
		case adds > 0:
			b = append(b, `],"remove":[`...)
		default:
			b = append(b, `"remove":[`...)
		}
		b = appendPort(b, p)
	}
	b = append(b, "]}\n"...)
	r.buf, r.removed = b, removed[:0]
	switch {
	case r.stale && r.failing && time.Now().Before(r.retryAt):
		return errWritePaused
	case r.stale:
		return r.compact()
	case adds == 0 && len(removed) == 0:
		return nil
	case !r.appendable:
		return r.compact() // the first change of this run after a journal it cannot continue
	}
	if err := r.append(b); err != nil {
		r.stale = true
		return err
	}
	if r.journalSize > max(r.baseSize, compactMin) {
		return r.compact()
	}
	return nil
}

// errWritePaused is apply's answer while a record whose last write failed
// waits before it tries again.
var errWritePaused = errors.New("ownership record not written: waiting after a failed write")

// append appends line to the journal in one write, and flushes it to the
// disk before it returns (the adds it records are sent after it).
func (r *record) append(line []byte) error {
	f, err := os.OpenFile(r.journal, os.O_WRONLY|os.O_APPEND|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("writing the ownership journal: %w", err)
	}
	n, err := f.Write(line)
	r.journalSize += int64(n)
	if err == nil {
		err = unix.Fdatasync(int(f.Fd()))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing the ownership journal: %w", err)
	}
	return nil
}

// compact writes held as a new base, then starts a new journal.
func (r *record) compact() error {
	es := slices.SortedFunc(func(yield func(exposure) bool) {
		for _, e := range r.held {
			if !yield(e) {
				return
			}
		}
	}, func(a, b exposure) int { return ComparePorts(a.Port, b.Port) })
	r.stale = true
	gen := rand.Uint64()
	for gen == 0 || gen == r.gen {
		gen = rand.Uint64()
	}
	b := appendRecord(r.buf[:0], r.sink, gen, es)
	r.buf = b
	if err := r.write(r.path, b); err != nil {
		return err
	}
	r.gen, r.baseSize, r.appendable = gen, int64(len(b)), false
	b = append(r.buf[:0], `{"sink":`...)
	b = appendJSONString(b, r.sink)
	b = append(b, `,"generation":`...)
	b = strconv.AppendUint(b, gen, 10)
	b = append(b, "}\n"...)
	r.buf = b
	if err := r.write(r.journal, b); err != nil {
		return err
	}
	r.journalSize, r.appendable, r.stale = int64(len(b)), true, false
	return nil
}

// write replaces the file at path with b, atomically and durably: the
// new file is flushed before it is renamed over the old, and the
// directory after.
func (r *record) write(path string, b []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("writing the ownership record: %w", err)
	}
	return nil
}

// syncDir flushes dir's entries (a rename in it) to the disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// identical reports whether a and b record the same entry.
func identical(a, b exposure) bool {
	return a.Claim == b.Claim && a.Port == b.Port && slices.Equal(a.ConnectAddrs, b.ConnectAddrs)
}

// appendRecord appends the JSON of recordFile{sink, gen, es} to b: the
// same bytes json.Marshal produces for it.
func appendRecord(b []byte, sink string, gen uint64, es []exposure) []byte {
	b = append(b, `{"sink":`...)
	b = appendJSONString(b, sink)
	if gen != 0 {
		b = append(b, `,"generation":`...)
		b = strconv.AppendUint(b, gen, 10)
	}
	b = append(b, `,"exposed":[`...)
	for i, e := range es {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendExposure(b, e)
	}
	return append(b, "]}"...)
}

// appendExposure appends the JSON of e, as json.Marshal writes it.
func appendExposure(b []byte, e exposure) []byte {
	b = append(b, `{"claim":{"source":`...)
	b = appendJSONString(b, e.Claim.Source)
	b = append(b, `,"id":`...)
	b = appendJSONString(b, e.Claim.ID)
	b = append(b, `},"port":`...)
	b = appendPort(b, e.Port)
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
	return append(b, '}')
}

// appendPort appends the JSON of p, as json.Marshal writes it.
func appendPort(b []byte, p Port) []byte {
	b = append(b, `{"protocol":`...)
	b = appendJSONString(b, string(p.Protocol))
	b = append(b, `,"containerPort":`...)
	b = strconv.AppendUint(b, uint64(p.ContainerPort), 10)
	b = append(b, `,"hostIP":`...)
	if p.HostIP.Zone() == "" {
		b = append(b, '"')
		b = p.HostIP.AppendTo(b) // digits, dots, colons and hex: nothing to escape
		b = append(b, '"')
	} else {
		b = appendJSONString(b, p.HostIP.String())
	}
	b = append(b, `,"hostPort":`...)
	b = strconv.AppendUint(b, uint64(p.HostPort), 10)
	return append(b, '}')
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
