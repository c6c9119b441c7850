// Package fusedisktest mounts fusedisk files for tests and gives them a
// file-backed Source that counts what it is asked to read.
package fusedisktest

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/kilnfs/kiln/internal/fusedisk"
	"github.com/kilnfs/kiln/internal/testenv"
)

// Mount mounts src in a temporary directory, unmounted when the test
// ends. It skips the test where FUSE mounts are unavailable.
func Mount(t testing.TB, src fusedisk.Source, opts fusedisk.Options) *fusedisk.Disk {
	t.Helper()
	d, err := fusedisk.Mount(t.TempDir(), src, opts)
	if errors.Is(err, fusedisk.ErrUnavailable) {
		testenv.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	return d
}

// File is a Source reading a file, counting the reads asked of it.
type File struct {
	f    *os.File
	size int64

	mu      sync.Mutex
	reads   int
	bytes   int64
	largest int
}

// OpenFile opens path as a Source, closed when the test ends.
func OpenFile(t testing.TB, path string) *File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return NewFile(f, fi.Size())
}

// NewFile is a Source reading size bytes of f.
func NewFile(f *os.File, size int64) *File { return &File{f: f, size: size} }

func (s *File) Size() int64 { return s.size }

func (s *File) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.mu.Lock()
	s.reads++
	s.bytes += int64(len(p))
	s.largest = max(s.largest, len(p))
	s.mu.Unlock()
	return s.f.ReadAt(p, off)
}

// Counts returns how many reads were asked, of how many bytes in all,
// and the largest.
func (s *File) Counts() (reads int, bytes int64, largest int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reads, s.bytes, s.largest
}
