package testenv

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"sync"
)

// ProcStat returns the fields of /proc/<pid>/stat that follow the
// parenthesised command name: the state first, then the parent's pid, and
// so on (utime and stime are at 11 and 12).
func ProcStat(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(f) < 13 {
		return nil, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, data)
	}
	return f, nil
}

// ForEach calls do for every item on workers goroutines and returns the
// first error; the other items are still done.
func ForEach[T any](workers int, items []T, do func(T) error) error {
	jobs := make(chan T)
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for range workers {
		wg.Go(func() {
			for item := range jobs {
				if err := do(item); err != nil {
					once.Do(func() { first = err })
				}
			}
		})
	}
	for _, item := range items {
		jobs <- item
	}
	close(jobs)
	wg.Wait()
	return first
}
