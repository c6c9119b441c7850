// Package workdir hands out private scratch directories for builds, each
// held by a lock while in use, so that a later run can tell the ones an
// interrupted run left behind and remove them.
package workdir

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Dir is a scratch directory held by a lock.
type Dir struct {
	Path string
	lock *os.File
}

const lockName = ".lock"

// New creates a scratch directory in parent.
func New(parent string) (*Dir, error) {
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(parent, "build-")
	if err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX)
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return &Dir{Path: dir, lock: lock}, nil
}

// trashPrefix names directories being deleted: whatever is left of one
// (the deleting process was killed) is garbage.
const trashPrefix = "trash-"

// Release deletes the directory. It is renamed out of the way first, so
// that a deletion cut short (which may take the lock file with it) leaves
// nothing that looks like a directory in use.
func (d *Dir) Release() error {
	path := d.Path
	trash := filepath.Join(filepath.Dir(path), trashPrefix+filepath.Base(path))
	if os.Rename(path, trash) == nil {
		path = trash
	}
	err := os.RemoveAll(path)
	d.lock.Close()
	return err
}

// RemoveStale deletes the scratch directories in parent whose lock nobody
// holds. A directory without a lock may be just being created, so it is
// only removed once it is an hour old.
func RemoveStale(parent string) {
	ents, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	for _, e := range ents {
		dir := filepath.Join(parent, e.Name())
		if strings.HasPrefix(e.Name(), trashPrefix) {
			os.RemoveAll(dir)
			continue
		}
		lock, err := os.Open(filepath.Join(dir, lockName))
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
