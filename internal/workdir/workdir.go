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
	problem, err := Unsafe(dir, 0o022, true)
	if err != nil || problem == "" {
		return err
	}
	return fmt.Errorf("%s %s: refusing to use it", dir, problem)
}

// Unsafe says what makes dir, which must exist, unsafe to keep kiln's
// files in, "" if nothing: it is not a directory, a user its mode bits
// others name (0o002: every user; 0o022: the group too) may write to it,
// or, when owned is set, the user kiln runs as does not own it.
func Unsafe(dir string, others os.FileMode, owned bool) (string, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return "", err
	}
	st := fi.Sys().(*syscall.Stat_t)
	mode := os.FileMode(st.Mode) & 0o7777
	switch euid := os.Geteuid(); {
	case !fi.IsDir():
		return "is not a directory", nil
	case mode&others&0o020 != 0:
		return fmt.Sprintf("is writable by group or others (mode %04o)", mode), nil
	case mode&others != 0:
		return fmt.Sprintf("is world-writable (mode %04o)", mode), nil
	case owned && int(st.Uid) != euid:
		return fmt.Sprintf("is owned by uid %d, not by the user kiln runs as (uid %d)", st.Uid, euid), nil
	}
	return "", nil
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
	// The lock takes its name only once it is held: RemoveStale, in
	// another process, could otherwise take a lock this run has created
	// but not yet locked, and delete the directory in use.
	lock, err := os.OpenFile(filepath.Join(dir, lockName+".new"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX)
		if err == nil {
			err = os.Rename(lock.Name(), filepath.Join(dir, lockName))
		}
		if err != nil {
			lock.Close()
		}
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
