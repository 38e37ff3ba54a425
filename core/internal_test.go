package core

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func recordSamples() [][]exposure {
	web := exposure{Claim: Key{Source: "docker", ID: "0123abcd"}, Port: Port{Protocol: TCP, ContainerPort: 80, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8080}}
	all := exposure{Claim: Key{Source: "kubernetes", ID: "default/web"}, Port: Port{Protocol: UDP, ContainerPort: 53, HostPort: 30053}}
	six := exposure{Claim: Key{Source: "static", ID: "v6"}, Port: Port{Protocol: TCP, ContainerPort: 443, HostIP: netip.MustParseAddr("::1"), HostPort: 8443}}
	zoned := exposure{Claim: Key{Source: "static", ID: "zoned"}, Port: Port{Protocol: TCP, ContainerPort: 1, HostIP: netip.MustParseAddr("fe80::1%eth<0>"), HostPort: 9}}
	odd := exposure{Claim: Key{Source: "s\"\\<&>\u2028", ID: "tab\there é \xff"}, Port: Port{Protocol: SCTP, ContainerPort: 65535, HostIP: netip.MustParseAddr("::ffff:10.0.0.1"), HostPort: 65535},
		ConnectAddrs: []ConnectAddr{{Network: "tcp", Addr: "198.18.0.2:80"}, {Network: "unix", Addr: "/run/a b\n.sock"}}}
	return [][]exposure{nil, {}, {web}, {web, all, six, zoned, odd}}
}

// loadable is the largest sample with its strings as they load back:
// JSON has no invalid UTF-8.
func loadable() []exposure {
	es := slices.Clone(recordSamples()[3])
	for i := range es {
		es[i].Claim.Source = strings.ToValidUTF8(es[i].Claim.Source, "\uFFFD")
		es[i].Claim.ID = strings.ToValidUTF8(es[i].Claim.ID, "\uFFFD")
	}
	return es
}

// byAddr keys ports as peers that key by address do.
func byAddr(p Port) sinkKey { return sinkKey{p.Protocol, hostAddr(p), p.HostPort} }

func TestRecordEncodingIsWhatJSONMarshalWrites(t *testing.T) {
	for _, es := range recordSamples() {
		for _, gen := range []uint64{0, 1, 1<<64 - 1} {
			want, err := json.Marshal(recordFile{Sink: "host-switch", Generation: gen, Exposed: cmpNil(es)})
			if err != nil {
				t.Fatal(err)
			}
			if got := appendRecord(nil, "host-switch", gen, es); !bytes.Equal(got, want) {
				t.Errorf("appendRecord(%v, %d)\n got %s\nwant %s", es, gen, got, want)
			}
		}
	}
}

// TestJournalLinesAreWhatJSONMarshalWrites checks the lines apply
// appends: adds, removes, and both in one line.
func TestJournalLinesAreWhatJSONMarshalWrites(t *testing.T) {
	all := recordSamples()[3]
	r := newRecord(t.TempDir(), "p")
	if _, err := r.load(byAddr, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if err := r.apply(heldOps(all[:1]), false); err != nil { // the first write compacts
		t.Fatal(err)
	}
	steps := []struct {
		ops  []recordOp
		want journalLine
	}{
		{heldOps(all[1:]), journalLine{Add: all[1:]}},
		{append(goneOps(all[:2]), heldOps(all[4:])...), journalLine{Remove: ports(all[:2])}}, // all[4] is recorded already
		{append(goneOps(all[2:3]), recordOp{key: byAddr(all[0].Port), exp: all[0], held: true}), journalLine{Add: all[:1], Remove: ports(all[2:3])}},
	}
	for i, s := range steps {
		if err := r.apply(s.ops, false); err != nil {
			t.Fatal(err)
		}
		want, err := json.Marshal(s.want)
		if err != nil {
			t.Fatal(err)
		}
		if got := lastLine(t, r.journal); got != string(want) {
			t.Errorf("step %d wrote\n %s\nwant\n %s", i, got, want)
		}
	}
}

func lastLine(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	return lines[len(lines)-1]
}

func heldOps(es []exposure) []recordOp {
	var ops []recordOp
	for _, e := range es {
		ops = append(ops, recordOp{key: byAddr(e.Port), exp: e, held: true})
	}
	return ops
}

func goneOps(es []exposure) []recordOp {
	var ops []recordOp
	for _, e := range es {
		ops = append(ops, recordOp{key: byAddr(e.Port)})
	}
	return ops
}

func ports(es []exposure) []Port {
	var ps []Port
	for _, e := range es {
		ps = append(ps, e.Port)
	}
	return ps
}

// cmpNil is es as save always wrote it: an empty list, never null.
func cmpNil(es []exposure) []exposure {
	if es == nil {
		return []exposure{}
	}
	return es
}

// loadSorted loads the record at dir (as a restarted agent does) and
// returns its entries in port order.
func loadSorted(t *testing.T, dir, sink string, key func(Port) sinkKey, log *zap.Logger) []exposure {
	t.Helper()
	es, err := newRecord(dir, sink).load(key, log)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	return sorted(es)
}

func sorted(es []exposure) []exposure {
	return slices.SortedFunc(slices.Values(es), func(a, b exposure) int { return ComparePorts(a.Port, b.Port) })
}

func sameEntries(a, b []exposure) bool {
	return slices.EqualFunc(sorted(a), sorted(b), identical)
}

func TestRecordSavesOnlyChangesAndLoadsTheLatest(t *testing.T) {
	dir := t.TempDir()
	r := newRecord(dir, "p")
	if _, err := r.load(byAddr, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	samples := recordSamples()
	a, b := samples[2], samples[3][:3]
	for i, es := range [][]exposure{a, a, b, b, a, nil, nil, b} {
		if err := r.apply(heldOps(es), true); err != nil {
			t.Fatalf("save %d: %v", i, err)
		}
		if got := loadSorted(t, dir, "p", byAddr, zap.NewNop()); !sameEntries(got, es) {
			t.Errorf("after save %d: loaded %v, want %v", i, got, es)
		}
	}
	// A save that changes nothing leaves the files alone.
	stat := func() (base, journal os.FileInfo) {
		t.Helper()
		base, err := os.Stat(filepath.Join(dir, "p.json"))
		if err != nil {
			t.Fatal(err)
		}
		journal, err = os.Stat(filepath.Join(dir, "p.journal"))
		if err != nil {
			t.Fatal(err)
		}
		return base, journal
	}
	base, journal := stat()
	if err := r.apply(heldOps(b), true); err != nil {
		t.Fatal(err)
	}
	if err := r.apply(heldOps(b[:1]), false); err != nil {
		t.Fatal(err)
	}
	base2, journal2 := stat()
	if !os.SameFile(base, base2) || !os.SameFile(journal, journal2) || journal2.Size() != journal.Size() {
		t.Error("saving unchanged content wrote to the record")
	}
	// New content is appended to the journal; the base stays.
	if err := r.apply(heldOps(a), true); err != nil {
		t.Fatal(err)
	}
	base3, journal3 := stat()
	if !os.SameFile(base, base3) || journal3.Size() <= journal2.Size() {
		t.Errorf("saving new content did not append to the journal (base replaced: %t, journal %d -> %d bytes)", !os.SameFile(base, base3), journal2.Size(), journal3.Size())
	}
}

// TestRecordJournalReplayEqualsTheState applies random batches (adds,
// changes and removes of a few hundred ports) and checks, after every
// 15th and after each compaction, that a fresh load gives exactly the
// state applied, through several
// compactions, for both ways peers key ports.
func TestRecordJournalReplayEqualsTheState(t *testing.T) {
	byPort := func(p Port) sinkKey { return sinkKey{proto: p.Protocol, port: p.HostPort} }
	for name, key := range map[string]func(Port) sinkKey{"by address": byAddr, "by port": byPort} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			r := newRecord(dir, "p")
			if _, err := r.load(key, zap.NewNop()); err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			addrs := []netip.Addr{{}, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
			state := map[sinkKey]exposure{}
			compactions, lastGen := 0, r.gen
			for batch := range 600 {
				var ops []recordOp
				seen := map[sinkKey]bool{}
				for range 1 + rng.IntN(20) {
					p := Port{Protocol: TCP, ContainerPort: 80, HostIP: addrs[rng.IntN(len(addrs))], HostPort: uint16(1000 + rng.IntN(300))}
					k := key(p)
					if seen[k] {
						continue
					}
					seen[k] = true
					if rng.IntN(3) == 0 {
						delete(state, k)
						ops = append(ops, recordOp{key: k})
						continue
					}
					e := exposure{Claim: Key{Source: "src", ID: fmt.Sprintf("c%d-%d", batch, rng.IntN(4))}, Port: p}
					if rng.IntN(4) == 0 {
						e.ConnectAddrs = []ConnectAddr{{Network: "tcp", Addr: fmt.Sprintf("198.18.0.%d:80", rng.IntN(9))}}
					}
					state[k] = e
					ops = append(ops, recordOp{key: k, exp: e, held: true})
				}
				if err := r.apply(ops, false); err != nil {
					t.Fatalf("batch %d: %v", batch, err)
				}
				compacted := r.gen != lastGen
				if compacted {
					compactions++
					lastGen = r.gen
				}
				if batch%15 != 0 && !compacted && batch != 599 {
					continue // loads take their time: look at some points, and at each compaction
				}
				want := slices.Collect(func(yield func(exposure) bool) {
					for _, e := range state {
						yield(e)
					}
				})
				if got := loadSorted(t, dir, "p", key, zap.NewNop()); !sameEntries(got, want) {
					t.Fatalf("after batch %d: loaded %d entries %v\nwant %d: %v", batch, len(got), got, len(want), sorted(want))
				}
			}
			if compactions < 3 {
				t.Errorf("%d compactions in 600 batches, want several: the journal is not compacted", compactions)
			}
			if fi, err := os.Stat(r.journal); err != nil || fi.Size() > 2*compactMin {
				t.Errorf("journal %v (%v): not kept small by compaction", fi.Size(), err)
			}
		})
	}
}

// recordWith makes a record in dir holding first, then second (in the
// journal), and returns it with the journal's bytes after first.
func recordWith(t *testing.T, dir string, first, second []recordOp) (*record, []byte) {
	t.Helper()
	r := newRecord(dir, "p")
	if _, err := r.load(byAddr, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if err := r.apply(first, false); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(r.journal)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.apply(second, false); err != nil {
		t.Fatal(err)
	}
	return r, before
}

func observed() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	return zap.New(core), logs
}

func TestRecordIgnoresATornJournalLine(t *testing.T) {
	all := loadable()
	dir := t.TempDir()
	r, _ := recordWith(t, dir, heldOps(all[:2]), heldOps(all[2:3]))
	if err := r.apply(heldOps(all[3:]), false); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(r.journal)
	if err != nil {
		t.Fatal(err)
	}
	// The agent was killed while it wrote the last line (the adds of
	// all[3:], not sent yet).
	last := bytes.LastIndexByte(b[:len(b)-1], '\n') + 1
	for _, cut := range []int{last + 1, len(b) - 5, len(b) - 1} {
		if err := os.WriteFile(r.journal, b[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		log, logs := observed()
		if got := loadSorted(t, dir, "p", byAddr, log); !sameEntries(got, all[:3]) {
			t.Errorf("cut at %d of %d: loaded %v, want %v", cut, len(b), got, all[:3])
		}
		if logs.FilterMessageSnippet("torn last line").Len() != 1 {
			t.Errorf("cut at %d: no log line about the torn line: %v", cut, logs.All())
		}
	}
	// The next run writes on: its changes are not glued to the torn line.
	r2 := newRecord(dir, "p")
	if _, err := r2.load(byAddr, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if err := r2.apply(goneOps(all[:1]), false); err != nil {
		t.Fatal(err)
	}
	if err := r2.apply(heldOps(all[4:]), false); err != nil {
		t.Fatal(err)
	}
	log, logs := observed()
	if got, want := loadSorted(t, dir, "p", byAddr, log), []exposure{all[1], all[2], all[4]}; !sameEntries(got, want) {
		t.Errorf("after the next run's changes: loaded %v, want %v", got, want)
	}
	if logs.Len() != 0 {
		t.Errorf("the next run left an irregular record: %v", logs.All())
	}
}

// TestRecordSurvivesAnInterruptedCompaction leaves the journal of the
// generation before the last compaction beside the new base, as an agent
// killed between the two renames does: the base says it all, and the old
// journal (whose replay would bring back a removed port) is not replayed.
func TestRecordSurvivesAnInterruptedCompaction(t *testing.T) {
	all := loadable()
	dir := t.TempDir()
	r, _ := recordWith(t, dir, heldOps(all[:2]), heldOps(all[2:4]))
	old, err := os.ReadFile(r.journal)
	if err != nil {
		t.Fatal(err)
	}
	// all[0] goes, but its line is lost (a failed write), then the
	// compaction renames the new base in and stops.
	r.stale = true
	if err := r.apply(goneOps(all[:1]), false); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.journal, old, 0o644); err != nil {
		t.Fatal(err)
	}
	log, logs := observed()
	if got, want := loadSorted(t, dir, "p", byAddr, log), all[1:4]; !sameEntries(got, want) {
		t.Errorf("loaded %v, want %v", got, want)
	}
	if logs.FilterMessageSnippet("not replayed").Len() != 1 {
		t.Errorf("no log line about the journal left out: %v", logs.All())
	}
	// The next run starts a journal of its own and writes on.
	r2 := newRecord(dir, "p")
	if _, err := r2.load(byAddr, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	if err := r2.apply(heldOps(all[4:]), false); err != nil {
		t.Fatal(err)
	}
	if got, want := loadSorted(t, dir, "p", byAddr, zap.NewNop()), all[1:]; !sameEntries(got, want) {
		t.Errorf("after the next run's add: loaded %v, want %v", got, want)
	}
}

// TestRecordLoadsTheFormatBeforeTheJournal loads a record as versions
// without a journal wrote it (the base alone, no generation), also with a
// journal of a later version left beside it (a downgrade and upgrade: the
// base is newer), and writes on from it.
func TestRecordLoadsTheFormatBeforeTheJournal(t *testing.T) {
	all := loadable()
	old, err := json.Marshal(struct {
		Sink    string     `json:"sink"`
		Exposed []exposure `json:"exposed"`
	}{"p", all[:3]})
	if err != nil {
		t.Fatal(err)
	}
	for _, journal := range []bool{false, true} {
		dir := t.TempDir()
		if journal {
			recordWith(t, dir, heldOps(all[3:]), goneOps(all[3:4]))
		}
		if err := os.WriteFile(filepath.Join(dir, "p.json"), old, 0o644); err != nil {
			t.Fatal(err)
		}
		if got := loadSorted(t, dir, "p", byAddr, zap.NewNop()); !sameEntries(got, all[:3]) {
			t.Errorf("journal %t: loaded %v, want %v", journal, got, all[:3])
		}
		r := newRecord(dir, "p")
		if _, err := r.load(byAddr, zap.NewNop()); err != nil {
			t.Fatal(err)
		}
		if err := r.apply(append(goneOps(all[:1]), heldOps(all[4:])...), false); err != nil {
			t.Fatal(err)
		}
		if got, want := loadSorted(t, dir, "p", byAddr, zap.NewNop()), []exposure{all[1], all[2], all[4]}; !sameEntries(got, want) {
			t.Errorf("journal %t, after a change: loaded %v, want %v", journal, got, want)
		}
	}
}

func TestRecordRejectsAJournalDamagedInTheMiddle(t *testing.T) {
	all := loadable()
	dir := t.TempDir()
	r, _ := recordWith(t, dir, heldOps(all[:2]), heldOps(all[2:3]))
	if err := r.apply(heldOps(all[3:]), false); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(r.journal)
	if err != nil {
		t.Fatal(err)
	}
	first := bytes.IndexByte(b, '\n') + 1
	b[first+3] = 0
	if err := os.WriteFile(r.journal, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if es, err := newRecord(dir, "p").load(byAddr, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "line 2 is not valid") {
		t.Errorf("load of a journal damaged in line 2 gave %v, %v; want an error naming the line", es, err)
	}
}
