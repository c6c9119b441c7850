// Package workdir hands out private scratch directories for builds, each
// held by a lock while in use, so that a later run can tell the ones an
// interrupted run left behind and remove them; and it makes sure the
// directory they live in is private to the user.
package workdir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Private creates dir (and missing parents) with mode 0700 if it does not
// exist, and refuses a directory, or a symlink to one, that another user
// owns or that group or others may write to. Whoever can write to kiln's
// cache can plant a built image that kiln hands out as the image's rootfs,
// and a cache in a shared place such as /tmp may have been made by anyone.
func Private(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	uid := os.Geteuid()
	li, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if li.Mode()&os.ModeSymlink != 0 {
		if owner := li.Sys().(*syscall.Stat_t).Uid; int(owner) != uid && owner != 0 {
			return fmt.Errorf("%s is a symlink owned by uid %d, not by uid %d that kiln runs as: refusing to use it", dir, owner, uid)
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if owner := fi.Sys().(*syscall.Stat_t).Uid; int(owner) != uid {
		return fmt.Errorf("%s is owned by uid %d, not by uid %d that kiln runs as: refusing to use it", dir, owner, uid)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %04o): refusing to use it (chmod go-w it)", dir, perm)
	}
	return nil
}

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
