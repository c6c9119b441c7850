package chunked

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/directio"
)

// Store is the local chunk cache: verified chunks by digest, shared by
// every image, kept across restarts within a budget; the chunks used
// least recently go first.
type Store struct {
	dir    string
	budget int64 // bytes; 0 is no budget

	mu       sync.Mutex
	size     int64
	entries  map[digest.Digest]*entry
	verified map[digest.Digest]bool // checked since the store was opened
}

type entry struct {
	size int64
	used time.Time
	busy int // reads in progress: not evicted
}

// StoreDir is where the chunk cache of a kiln cache directory is.
func StoreDir(cacheDir string) string { return filepath.Join(cacheDir, "chunks") }

// OpenStore opens (or creates) the chunk cache in dir.
func OpenStore(dir string, budget int64) (*Store, error) {
	s := &Store{dir: dir, budget: budget, entries: map[digest.Digest]*entry{}, verified: map[digest.Digest]bool{}}
	if err := os.MkdirAll(filepath.Join(dir, "sha256"), 0o700); err != nil {
		return nil, err
	}
	err := walkStore(dir, func(c CachedChunk) {
		s.entries[c.Digest] = &entry{size: c.Info.Size(), used: c.Info.ModTime()}
		s.size += c.Info.Size()
	}, func(path string) {
		os.Remove(path) // a chunk being written when kiln stopped
	})
	return s, err
}

// CachedChunk is a chunk file in a chunk cache.
type CachedChunk struct {
	Digest digest.Digest
	Path   string
	Info   os.FileInfo
}

// ListStore lists the chunks cached in dir, as OpenStore would find them;
// a missing dir holds none.
func ListStore(dir string) ([]CachedChunk, error) {
	var out []CachedChunk
	err := walkStore(dir, func(c CachedChunk) { out = append(out, c) }, func(string) {})
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return out, err
}

// walkStore calls chunk for each whole chunk in dir, other for any other
// file.
func walkStore(dir string, chunk func(CachedChunk), other func(path string)) error {
	root := filepath.Join(dir, "sha256")
	ents, err := os.ReadDir(root)
	if err != nil {
		return err
	}
	for _, e := range ents {
		p := filepath.Join(root, e.Name())
		d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		info, err := e.Info()
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil || !info.Mode().IsRegular() || d.Validate() != nil || info.Size() <= 0 || info.Size() > MaxChunkSize {
			other(p)
			continue
		}
		chunk(CachedChunk{Digest: d, Path: p, Info: info})
	}
	return nil
}

func (s *Store) path(d digest.Digest) string { return filepath.Join(s.dir, "sha256", d.Encoded()) }

// ReadAt reads a cached chunk's bytes at off into p; it reports false
// when the chunk is not cached, or is and does not match its digest (it
// is then removed). size is the chunk's length as the index gives it: a
// chunk of that digest and another length is the index's error.
func (s *Store) ReadAt(d digest.Digest, size int64, p []byte, off int64) (bool, error) {
	s.mu.Lock()
	e := s.entries[d]
	if e == nil {
		s.mu.Unlock()
		return false, nil
	}
	e.busy++
	check := !s.verified[d]
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		e.busy--
		s.mu.Unlock()
	}()
	if check {
		// Once per chunk and run: a cache on disk can rot, or lose the
		// end of a file a crash caught.
		b, err := os.ReadFile(s.path(d))
		if err != nil || digest.FromBytes(b) != d {
			s.drop(d)
			return false, nil
		}
		s.mu.Lock()
		s.verified[d] = true
		s.mu.Unlock()
		if int64(len(b)) != size {
			return false, lengthError(d, size, int64(len(b)))
		}
		copy(p, b[off:])
		s.touch(d, e)
		return true, nil
	}
	if e.size != size {
		return false, lengthError(d, size, e.size)
	}
	f, err := os.Open(s.path(d))
	if err != nil {
		s.drop(d)
		return false, nil
	}
	defer f.Close()
	if _, err := f.ReadAt(p, off); err != nil {
		s.drop(d) // changed since it was checked
		return false, nil
	}
	s.touch(d, e)
	return true, nil
}

func lengthError(d digest.Digest, want, got int64) error {
	return fmt.Errorf("the index gives chunk %s a length of %d bytes; that chunk has %d", d, want, got)
}

// touch records a use; the file's mtime keeps it across restarts, at
// most once a minute per chunk.
func (s *Store) touch(d digest.Digest, e *entry) {
	now := time.Now()
	s.mu.Lock()
	stale := now.Sub(e.used) > time.Minute
	e.used = now
	s.mu.Unlock()
	if stale {
		os.Chtimes(s.path(d), now, now) //nolint:errcheck // only the order of eviction
	}
}

// Has says whether a chunk is cached.
func (s *Store) Has(d digest.Digest) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.entries[d] != nil
}

// Put caches a chunk whose bytes b the caller verified against d, and
// evicts what the budget no longer holds.
func (s *Store) Put(d digest.Digest, b []byte) error {
	if s.Has(d) {
		return nil
	}
	tmp := s.path(d) + ".tmp-" + fmt.Sprint(time.Now().UnixNano())
	// Around the page cache: the bytes are in the reader's memory and
	// in the mounted file's page cache already.
	if err := directio.WriteFile(tmp, b, 0o600); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, s.path(d)); err != nil {
		os.Remove(tmp)
		return err
	}
	s.mu.Lock()
	if s.entries[d] == nil {
		s.entries[d] = &entry{size: int64(len(b)), used: time.Now()}
		s.size += int64(len(b))
	}
	s.verified[d] = true
	s.mu.Unlock()
	if s.budget > 0 && s.Size() > s.budget {
		// Down to 90%: the next puts need not prune again at once.
		s.Prune(s.budget - s.budget/10)
	}
	return nil
}

func (s *Store) drop(d digest.Digest) {
	s.mu.Lock()
	if e := s.entries[d]; e != nil {
		s.size -= e.size
		delete(s.entries, d)
	}
	delete(s.verified, d)
	s.mu.Unlock()
	os.Remove(s.path(d))
}

// Prune evicts the least recently used chunks not being read until the
// cache holds at most budget bytes (0: no budget), and returns what it
// freed.
func (s *Store) Prune(budget int64) int64 {
	if budget <= 0 {
		return 0
	}
	s.mu.Lock()
	if s.size <= budget {
		s.mu.Unlock()
		return 0
	}
	type use struct {
		d digest.Digest
		e *entry
	}
	var all []use
	for d, e := range s.entries {
		all = append(all, use{d, e})
	}
	sort.Slice(all, func(i, j int) bool {
		if !all[i].e.used.Equal(all[j].e.used) {
			return all[i].e.used.Before(all[j].e.used)
		}
		return all[i].d < all[j].d
	})
	var freed int64
	for _, u := range all {
		if s.size <= budget {
			break
		}
		if u.e.busy > 0 {
			continue
		}
		freed += u.e.size
		s.size -= u.e.size
		delete(s.entries, u.d)
		delete(s.verified, u.d)
		// Under the lock: a Put of the same chunk meanwhile must not
		// lose its file.
		os.Remove(s.path(u.d))
	}
	s.mu.Unlock()
	return freed
}

// Size is the bytes cached.
func (s *Store) Size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.size
}
