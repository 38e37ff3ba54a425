package core

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
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

func TestRecordEncodingIsWhatJSONMarshalWrites(t *testing.T) {
	for _, es := range recordSamples() {
		want, err := json.Marshal(recordFile{Sink: "host-switch", Exposed: cmpNil(es)})
		if err != nil {
			t.Fatal(err)
		}
		if got := appendRecord(nil, "host-switch", es); !bytes.Equal(got, want) {
			t.Errorf("appendRecord(%v)\n got %s\nwant %s", es, got, want)
		}
	}
}

// cmpNil is es as save always wrote it: an empty list, never null.
func cmpNil(es []exposure) []exposure {
	if es == nil {
		return []exposure{}
	}
	return es
}

func TestRecordSavesOnlyChangesAndLoadsTheLatest(t *testing.T) {
	dir := t.TempDir()
	r := newRecord(dir, "p")
	samples := recordSamples()
	a, b := samples[2], samples[3][:3]
	for i, es := range [][]exposure{a, a, b, b, a, nil, nil, b} {
		if err := r.save(es); err != nil {
			t.Fatalf("save %d: %v", i, err)
		}
		got, err := r.load()
		if err != nil {
			t.Fatalf("load after save %d: %v", i, err)
		}
		if !slices.EqualFunc(got, es, func(x, y exposure) bool {
			return x.Claim == y.Claim && x.Port == y.Port && slices.Equal(x.ConnectAddrs, y.ConnectAddrs)
		}) {
			t.Errorf("after save %d: loaded %v, want %v", i, got, es)
		}
	}
	// A save that changes nothing leaves the file alone.
	before, err := os.Stat(filepath.Join(dir, "p.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.save(b); err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(filepath.Join(dir, "p.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) {
		t.Error("saving unchanged content replaced the file")
	}
	if err := r.save(a); err != nil {
		t.Fatal(err)
	}
	if changed, err := os.Stat(filepath.Join(dir, "p.json")); err != nil || os.SameFile(after, changed) {
		t.Errorf("saving new content did not replace the file (%v)", err)
	}
}
