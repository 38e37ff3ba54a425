package testenv

import (
	"errors"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
)

func TestProcStatOfSelf(t *testing.T) {
	f, err := ProcStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if ppid, err := strconv.Atoi(f[1]); err != nil || ppid != os.Getppid() {
		t.Errorf("parent pid field %q, want %d", f[1], os.Getppid())
	}
	if _, err := strconv.ParseInt(f[11], 10, 64); err != nil {
		t.Errorf("utime field %q: %v", f[11], err)
	}
}

func TestForEachDoesEveryItemAndReportsAnError(t *testing.T) {
	var mu sync.Mutex
	var done []int
	boom := errors.New("boom")
	err := ForEach(3, []int{1, 2, 3, 4, 5, 6, 7}, func(i int) error {
		mu.Lock()
		done = append(done, i)
		mu.Unlock()
		if i == 4 {
			return boom
		}
		return nil
	})
	if !errors.Is(err, boom) {
		t.Errorf("err = %v, want boom", err)
	}
	slices.Sort(done)
	if !slices.Equal(done, []int{1, 2, 3, 4, 5, 6, 7}) {
		t.Errorf("did %v", done)
	}
}
