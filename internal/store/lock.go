package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Runs of kiln sharing a cache coordinate with flock on files under
// locks/, so that a killed run lets go: one file per layer blob (exclusive
// while a run fetches the blob or a prune evicts it, shared while a run
// reads it) and one per built image (shared while a run serves it,
// exclusive while it is removed). Whoever removes an entry deletes its
// lock file while holding it exclusively; a run that opened that file
// before and gets the lock after finds that the name no longer leads to
// it, and locks the new file of that name instead.

// Lock is a held lock; Unlock lets go of it.
type Lock struct{ f *os.File }

// Unlock lets go of the lock. A nil Lock holds nothing.
func (l *Lock) Unlock() {
	if l != nil {
		l.f.Close()
	}
}

// removeFile deletes the lock's file; only for a lock held exclusively,
// before Unlock.
func (l *Lock) removeFile() error {
	if err := os.Remove(l.f.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// lockFile takes the lock at path, waiting while others hold it in a way
// that conflicts.
func lockFile(ctx context.Context, path string, exclusive bool) (*Lock, error) {
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for waited := false; ; waited = true {
		l, err := flockPath(path, how)
		if l != nil || err != nil {
			return l, err
		}
		if !waited {
			log.G(ctx).WithField("lock", filepath.Base(path)).Debug("another run of kiln holds the lock: waiting for it")
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// tryLock takes the lock at path exclusively if nobody holds it; it
// returns nil and no error if somebody does.
func tryLock(path string) (*Lock, error) {
	return flockPath(path, unix.LOCK_EX)
}

// flockPath takes the lock at path (how: LOCK_SH or LOCK_EX) without
// waiting: nil and no error if another holds it in a way that conflicts.
// The lock is of the file path names once it is taken, not of one that a
// removal deleted meanwhile.
func flockPath(path string, how int) (*Lock, error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, nil
			}
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		held, err1 := f.Stat()
		named, err2 := os.Stat(path)
		if err1 == nil && err2 == nil && os.SameFile(held, named) {
			return &Lock{f: f}, nil
		}
		f.Close()
		if err1 != nil {
			return nil, fmt.Errorf("locking %s: %w", path, err1)
		}
		if err2 != nil && !errors.Is(err2, os.ErrNotExist) {
			return nil, fmt.Errorf("locking %s: %w", path, err2)
		}
		// Removed (and perhaps made again) while we locked: again.
	}
}

// The lock files under locks/: ALGORITHM-HEX for a blob, rootfs-KEY for
// an image and rootfs-KEY.meta for its record of use, and manage.
const (
	rootfsLockPrefix = "rootfs-"
	recordLockSuffix = ".meta"
)

func (s *Store) blobLockPath(d digest.Digest) string {
	return filepath.Join(s.root, "locks", d.Algorithm().String()+"-"+d.Encoded())
}

func (s *Store) rootfsLockPath(key string) string {
	return filepath.Join(s.root, "locks", rootfsLockPrefix+key)
}

func (s *Store) recordLockPath(key string) string {
	return s.rootfsLockPath(key) + recordLockSuffix
}

// lockOwner is the entry whose lock file is named name: an image's key or
// a blob's digest; neither for the management lock, or a name kiln does
// not make.
func lockOwner(name string) (key string, blob digest.Digest) {
	if k, ok := strings.CutPrefix(strings.TrimSuffix(name, recordLockSuffix), rootfsLockPrefix); ok && validKey(k) {
		return k, ""
	}
	if alg, hex, ok := strings.Cut(name, "-"); ok {
		if d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex); d.Validate() == nil {
			return "", d
		}
	}
	return "", ""
}

// LockBlob takes the lock of a layer blob: exclusive to fetch it into the
// cache, shared to read it from there. A shared lock waits while a run
// fetches the blob or a prune evicts it, and keeps prunes from evicting it
// while held. Taking the lock marks the blob used.
func (s *Store) LockBlob(ctx context.Context, d digest.Digest, exclusive bool) (*Lock, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	l, err := lockFile(ctx, s.blobLockPath(d), exclusive)
	if err != nil {
		return nil, err
	}
	// The lock file's modification time is the blob's last use: the
	// access time is not kept on most mounts (noatime, relatime).
	now := time.Now()
	os.Chtimes(l.f.Name(), now, now) //nolint:errcheck // only the LRU order suffers
	return l, nil
}

// UseRootfs takes a shared lock on the image built under key, so that no
// prune or rm removes it while a run serves it; the caller holds it until
// the image is copied out.
func (s *Store) UseRootfs(ctx context.Context, key string) (*Lock, error) {
	if !validKey(key) {
		return nil, fmt.Errorf("invalid build key %q", key)
	}
	return lockFile(ctx, s.rootfsLockPath(key), false)
}

// validKey reports whether key looks like a build key (lowercase hex), so
// that it is safe in a file name.
func validKey(key string) bool {
	if key == "" {
		return false
	}
	for _, c := range key {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
