package core

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// loadWithin loads the record of sink "p" in dir, failing the test when
// the load does not return within a few seconds (it blocked).
func loadWithin(t *testing.T, dir string) ([]exposure, error) {
	t.Helper()
	type result struct {
		es  []exposure
		err error
	}
	done := make(chan result, 1)
	go func() {
		es, err := newRecord(dir, "p").load(byAddr, zap.NewNop())
		done <- result{es, err}
	}()
	select {
	case r := <-done:
		return r.es, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("loading the record blocked")
		return nil, nil
	}
}

// TestRecordFilesThatAreNotRecords are refused promptly with an error
// that names the reason, whichever of the two files it is: a FIFO (which
// a plain read would block on for good), a link to /dev/zero (endless),
// a file over the size bound, a record with more entries than a sink
// can hold, another sink's record.
func TestRecordFilesThatAreNotRecords(t *testing.T) {
	many := func() []byte {
		var b bytes.Buffer
		b.WriteString(`{"sink":"p","exposed":[`)
		for i := range maxRecordEntries + 1 {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"claim":{"source":"s","id":"%d"},"port":{"protocol":"tcp","containerPort":1,"hostIP":"10.%d.%d.%d","hostPort":80}}`, i, i>>16&255, i>>8&255, i&255)
		}
		b.WriteString(`]}`)
		return b.Bytes()
	}
	for _, file := range []string{"p.json", "p.journal"} {
		cases := []struct {
			name, want string
			make       func(t *testing.T, path string)
		}{
			{"fifo", "not a regular file", func(t *testing.T, path string) {
				if err := syscall.Mkfifo(path, 0o600); err != nil {
					t.Fatal(err)
				}
			}},
			{"link to /dev/zero", "symbolic link", func(t *testing.T, path string) {
				if err := os.Symlink("/dev/zero", path); err != nil {
					t.Fatal(err)
				}
			}},
			{"over the size bound", "larger than", func(t *testing.T, path string) {
				if err := os.WriteFile(path, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(path, maxRecordBytes+1); err != nil {
					t.Fatal(err)
				}
			}},
		}
		if file == "p.json" {
			cases = append(cases,
				struct {
					name, want string
					make       func(t *testing.T, path string)
				}{"too many entries", "more than the", func(t *testing.T, path string) {
					if err := os.WriteFile(path, many(), 0o600); err != nil {
						t.Fatal(err)
					}
				}},
				struct {
					name, want string
					make       func(t *testing.T, path string)
				}{"another sink's", `sink "q"'s`, func(t *testing.T, path string) {
					if err := os.WriteFile(path, []byte(`{"sink":"q","exposed":[]}`), 0o600); err != nil {
						t.Fatal(err)
					}
				}})
		}
		for _, tc := range cases {
			t.Run(file+"/"+tc.name, func(t *testing.T) {
				dir := t.TempDir()
				tc.make(t, filepath.Join(dir, file))
				es, err := loadWithin(t, dir)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("load = %v, %v; want an error saying %q", es, err, tc.want)
				}
			})
		}
	}
}

// TestRecordEntriesTheAgentCannotHaveWritten are left out of a loaded
// record, with one warning that counts them; the valid ones load.
func TestRecordEntriesTheAgentCannotHaveWritten(t *testing.T) {
	dir := t.TempDir()
	base := `{"sink":"p","generation":7,"exposed":[` +
		`{"claim":{"source":"docker","id":"ok"},"port":{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":8080}},` +
		`{"claim":{"source":"docker","id":"proto"},"port":{"protocol":"icmp","containerPort":80,"hostIP":"127.0.0.1","hostPort":8081}},` +
		`{"claim":{"source":"","id":"nosource"},"port":{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":8082}}]}`
	journal := `{"sink":"p","generation":7}` + "\n" +
		`{"add":[{"claim":{"source":"docker","id":"zero"},"port":{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":0}},` +
		`{"claim":{"source":"docker","id":"addr"},"port":{"protocol":"udp","containerPort":53,"hostIP":"127.0.0.1","hostPort":5353},"connectAddrs":[{"network":"","addr":"x"}]},` +
		`{"claim":{"source":"docker","id":"ok2"},"port":{"protocol":"udp","containerPort":53,"hostIP":"127.0.0.1","hostPort":5354}}]}` + "\n"
	if err := os.WriteFile(filepath.Join(dir, "p.json"), []byte(base), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "p.journal"), []byte(journal), 0o600); err != nil {
		t.Fatal(err)
	}
	log, logs := observed()
	es, err := newRecord(dir, "p").load(byAddr, log)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range es {
		ids = append(ids, e.Claim.ID)
	}
	if len(ids) != 2 || !(ids[0] == "ok" && ids[1] == "ok2" || ids[0] == "ok2" && ids[1] == "ok") {
		t.Errorf("loaded %q, want ok and ok2", ids)
	}
	warns := logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warns) != 1 || warns[0].ContextMap()["entries"] != int64(4) {
		t.Errorf("want one warning counting 4 entries, have %v", warns)
	}
}

// TestRecordThatCannotBeWrittenWarnsOnce makes the record's files
// unwritable (a directory where the base goes): many batches give one
// warning and no more writes than one per failedWriteWait; once the path
// is free again the record is written whole and says so.
func TestRecordThatCannotBeWrittenWarnsOnce(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "p.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "p.json", "x"), nil, 0o600); err != nil {
		t.Fatal(err) // a directory that is not empty: rename cannot replace it
	}
	log, logs := observed()
	w := newSinkWorker("p", nil, nil, log)
	w.record = newRecord(dir, "p") // as loaded from nothing: the first write compacts
	for i := range 50 {
		e := exposure{Claim: Key{Source: "s", ID: "a"}, Port: Port{Protocol: TCP, HostPort: uint16(1000 + i)}}
		w.writeRecord([]recordOp{{key: byAddr(e.Port), exp: e, held: true}}, false)
	}
	if n := logs.FilterLevelExact(zap.WarnLevel).Len(); n != 1 {
		t.Errorf("%d warnings for 50 failed writes, want 1: %v", n, logs.All())
	}
	if err := os.RemoveAll(filepath.Join(dir, "p.json")); err != nil {
		t.Fatal(err)
	}
	w.record.retryAt = time.Now() // as if failedWriteWait had passed
	e := exposure{Claim: Key{Source: "s", ID: "a"}, Port: Port{Protocol: TCP, HostPort: 2000}}
	w.writeRecord([]recordOp{{key: byAddr(e.Port), exp: e, held: true}}, false)
	if logs.FilterMessage("ownership record written again").Len() != 1 {
		t.Errorf("no note that the record works again: %v", logs.All())
	}
	es, err := newRecord(dir, "p").load(byAddr, zap.NewNop())
	if err != nil || len(es) != 51 {
		t.Errorf("the record written again holds %d entries (%v), want 51", len(es), err)
	}
}

// FuzzRecordLoad loads any base and journal: it never panics, and what it
// loads is a set of valid entries that, written back whole, loads again
// unchanged.
func FuzzRecordLoad(f *testing.F) {
	f.Add([]byte(`{"sink":"p","generation":7,"exposed":[{"claim":{"source":"docker","id":"a"},"port":{"protocol":"tcp","containerPort":80,"hostIP":"127.0.0.1","hostPort":8080}}]}`),
		[]byte(`{"sink":"p","generation":7}`+"\n"+`{"add":[{"claim":{"source":"k","id":"b"},"port":{"protocol":"udp","containerPort":53,"hostIP":"::1","hostPort":53},"connectAddrs":[{"network":"unix","addr":"/run/x"}]}],"remove":[{"protocol":"tcp","containerPort":0,"hostIP":"127.0.0.1","hostPort":8080}]}`+"\n"))
	f.Add([]byte(`{"sink":"p","exposed":[]}`), []byte(`{"sink":"p","generation":1}`+"\n"+`{"add":[`))
	f.Fuzz(func(t *testing.T, base, journal []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "p.json"), base, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "p.journal"), journal, 0o600); err != nil {
			t.Fatal(err)
		}
		r := newRecord(dir, "p")
		es, err := r.load(byAddr, zap.NewNop())
		if err != nil {
			return
		}
		var ops []recordOp
		for _, e := range es {
			if !validEntry(e) {
				t.Fatalf("loaded an entry the agent cannot have written: %+v", e)
			}
			ops = append(ops, recordOp{key: byAddr(e.Port), exp: e, held: true})
		}
		r.stale = true // write it whole
		if err := r.apply(ops, true); err != nil {
			t.Fatal(err)
		}
		again, err := newRecord(dir, "p").load(byAddr, zap.NewNop())
		if err != nil {
			t.Fatalf("the record written back does not load: %v", err)
		}
		if len(again) != len(es) {
			t.Fatalf("loaded %d entries, then %d after writing them back", len(es), len(again))
		}
		byKey := map[sinkKey]exposure{}
		for _, e := range es {
			byKey[byAddr(e.Port)] = e
		}
		for _, e := range again {
			// Claims compare loosely: an ID that is not UTF-8 comes back
			// with U+FFFD, as encoding/json writes it.
			if o, ok := byKey[byAddr(e.Port)]; !ok || o.Port != e.Port || len(o.ConnectAddrs) != len(e.ConnectAddrs) {
				t.Fatalf("entry %+v changed when written back (was %+v)", e, o)
			}
		}
	})
}
