package main

import (
	"strings"
	"testing"
)

// TestPageOutExecutable pages out this test binary's own code and
// read-only data, as the agent does with its own, and checks that most of
// what was resident of it is released.
func TestPageOutExecutable(t *testing.T) {
	before := rssFileKB()
	if before < 0 {
		t.Fatal("no RssFile in /proc/self/status")
	}
	if err := pageOutExecutable(); err != nil {
		t.Fatal(err)
	}
	after := rssFileKB()
	t.Logf("RssFile %d kB before, %d kB after", before, after)
	if after < 0 || after > before/2 {
		t.Errorf("RssFile %d kB after the page-out, was %d kB: want less than half", after, before)
	}
}

func TestNegativePageOutIntervalIsRejected(t *testing.T) {
	code, _, errOut := runCLI(t, "--sources=static", "--sinks=stdout", "--pageOutInterval=-1s")
	if code != 2 || !strings.Contains(errOut, "--pageOutInterval must not be negative") {
		t.Errorf("exit %d, %q", code, errOut)
	}
}
