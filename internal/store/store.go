// Package store is kiln's cache directory for standalone conversion: layer
// blobs in a content-addressed store (containerd's local content store,
// which verifies what it ingests), built rootfs images keyed by what they
// were built from, and private work directories that a later run cleans up
// if the run that made them was interrupted.
package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"golang.org/x/sys/unix"
)

// Store is a cache directory.
type Store struct {
	root    string
	content content.Store
}

// DefaultDir is /var/lib/kiln for root and the user's cache directory
// otherwise.
func DefaultDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/kiln"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "kiln")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("kiln-%d", os.Geteuid()))
}

// Open opens (creating if needed) the cache at root and removes work
// directories that interrupted runs left behind.
func Open(root string) (*Store, error) {
	for _, d := range []string{"content", "rootfs", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("cache directory: %w", err)
		}
	}
	cs, err := local.NewStore(filepath.Join(root, "content"))
	if err != nil {
		return nil, fmt.Errorf("content store: %w", err)
	}
	s := &Store{root: root, content: cs}
	s.removeStale()
	return s, nil
}

// Root returns the cache directory.
func (s *Store) Root() string { return s.root }

// Content returns the blob store.
func (s *Store) Content() content.Store { return s.content }

// RootfsPath is where the image built under key lives.
func (s *Store) RootfsPath(key string) string {
	return filepath.Join(s.root, "rootfs", key+".ext4")
}

// HasRootfs reports whether an image was built under key.
func (s *Store) HasRootfs(key string) bool {
	_, err := os.Stat(s.RootfsPath(key))
	return err == nil
}

// PublishRootfs moves a finished image into the cache under key. Rename is
// atomic: readers see the whole file or none.
func (s *Store) PublishRootfs(file, key string) (string, error) {
	dst := s.RootfsPath(key)
	if err := os.Chmod(file, 0o444); err != nil {
		return "", err
	}
	if err := os.Rename(file, dst); err != nil {
		return "", fmt.Errorf("publishing rootfs: %w", err)
	}
	return dst, nil
}

// WorkDir is a private directory for one build, held by a lock while in
// use.
type WorkDir struct {
	Path string
	lock *os.File
}

// NewWorkDir creates a work directory. Release removes it.
func (s *Store) NewWorkDir() (*WorkDir, error) {
	dir, err := os.MkdirTemp(filepath.Join(s.root, "tmp"), "build-")
	if err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX)
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return &WorkDir{Path: dir, lock: lock}, nil
}

// Release deletes the work directory.
func (w *WorkDir) Release() error {
	err := os.RemoveAll(w.Path)
	w.lock.Close()
	return err
}

// removeStale deletes work directories whose lock nobody holds: their run
// was interrupted. A directory without a lock may be just being created,
// so it is only removed once it is old.
func (s *Store) removeStale() {
	tmp := filepath.Join(s.root, "tmp")
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return
	}
	for _, e := range ents {
		dir := filepath.Join(tmp, e.Name())
		lock, err := os.Open(filepath.Join(dir, ".lock"))
		if errors.Is(err, os.ErrNotExist) {
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > time.Hour {
				os.RemoveAll(dir)
			}
			continue
		}
		if err != nil {
			continue
		}
		if unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.RemoveAll(dir)
		}
		lock.Close()
	}
}
