package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// pageOutDelay is how long after start the agent first pages out its
// executable: by then package initialisation and the sources' first sync
// are over.
const pageOutDelay = 15 * time.Second

// pageOutLoop pages out the agent's executable pageOutDelay after start and
// then every interval, until ctx is done. Most of the executable's pages
// that are resident after start-up were touched once, by package
// initialisation (of every plugin built in, enabled or not) and the first
// sync, or were never touched at all and came in with their neighbours
// (the kernel maps up to 64 KiB around each page fault). They would count
// in the agent's RSS, and hold page cache, until memory pressure reclaims
// them; at rest the agent needs a few MB of them, which fault back in.
func pageOutLoop(ctx context.Context, interval time.Duration, log *zap.Logger) {
	t := time.NewTimer(pageOutDelay)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		before := rssFileKB()
		if err := pageOutExecutable(); err != nil {
			log.Warn("cannot page out the executable's pages; not trying again", zap.Error(err))
			return
		}
		log.Debug("paged out the executable's pages", zap.Int64("rss_file_kb_before", before), zap.Int64("rss_file_kb_after", rssFileKB()))
		t.Reset(interval)
	}
}

// pageOutExecutable asks the kernel to reclaim the pages of the running
// executable's read-only mappings (its code and read-only data), with
// madvise(MADV_PAGEOUT): clean pages only this process maps are dropped,
// and fault back in when they are used again.
func pageOutExecutable() error {
	var exe syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &exe); err != nil {
		return fmt.Errorf("the executable: %w", err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return err
	}
	found := false
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// start-end perms offset dev inode path
		f := strings.Fields(sc.Text())
		if len(f) < 6 || strings.Contains(f[1], "w") {
			continue
		}
		if ino, err := strconv.ParseUint(f[4], 10, 64); err != nil || ino != exe.Ino {
			continue
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			return fmt.Errorf("/proc/self/maps: unexpected line %q", sc.Text())
		}
		found = true
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_PAGEOUT); e != 0 {
			return fmt.Errorf("madvise(MADV_PAGEOUT): %w", e)
		}
	}
	if !found {
		return errors.New("no mapping of the executable in /proc/self/maps")
	}
	return nil
}

// rssFileKB returns the process's file-backed resident memory (RssFile of
// /proc/self/status), or -1.
func rssFileKB() int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}
