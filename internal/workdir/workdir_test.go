package workdir

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// TestRemoveStaleSparesDirsInUse runs RemoveStale over and over while
// other goroutines create scratch directories and use them: no directory
// may vanish before its Release.
func TestRemoveStaleSparesDirsInUse(t *testing.T) {
	parent := t.TempDir()
	var stop atomic.Bool
	var sweeps sync.WaitGroup
	sweeps.Add(1)
	go func() {
		defer sweeps.Done()
		for !stop.Load() {
			RemoveStale(parent)
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				d, err := New(parent)
				if err != nil {
					errs <- err
					return
				}
				f := filepath.Join(d.Path, "data")
				if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
					errs <- err
					return
				}
				if _, err := os.Stat(f); err != nil {
					errs <- err
					return
				}
				if err := d.Release(); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	stop.Store(true)
	sweeps.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestRemoveStale removes what a killed run left (an unheld lock, a
// half-deleted directory) and keeps a directory in use.
func TestRemoveStale(t *testing.T) {
	parent := t.TempDir()
	held, err := New(parent)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	left := filepath.Join(parent, "build-left")
	if err := os.Mkdir(left, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(left, lockName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	trash := filepath.Join(parent, trashPrefix+"build-x")
	if err := os.Mkdir(trash, 0o700); err != nil {
		t.Fatal(err)
	}
	young := filepath.Join(parent, "build-young")
	if err := os.Mkdir(young, 0o700); err != nil {
		t.Fatal(err)
	}
	RemoveStale(parent)
	for _, gone := range []string{left, trash} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s: still there (%v)", gone, err)
		}
	}
	for _, kept := range []string{held.Path, young} {
		if _, err := os.Stat(kept); err != nil {
			t.Errorf("%s: %v", kept, err)
		}
	}
}
