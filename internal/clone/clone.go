// Package clone copies large, sparse image files cheaply: a reflink where
// the filesystem can share blocks (XFS, btrfs), otherwise a copy of the
// data regions only, done in the kernel, so holes stay holes.
package clone

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// File copies src to dst, which must not exist.
func File(src, dst string, perm os.FileMode) error { return create(src, dst, perm, Into) }

// create makes dst, which must not exist, with copy from src; a failed
// copy leaves no dst.
func create(src, dst string, perm os.FileMode, copy func(out, in *os.File) error) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	return copy(out, in)
}

// Into copies all of in into the empty file out.
func Into(out, in *os.File) error {
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		return nil
	}
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if err := Regions(out, in); err != nil {
		return fmt.Errorf("copying %s: %w", in.Name(), err)
	}
	return out.Truncate(st.Size())
}

// Regions copies the data regions of in (found with SEEK_DATA and
// SEEK_HOLE) into out at the same offsets; what in has as holes, out
// keeps as it was.
func Regions(out, in *os.File) error {
	st, err := in.Stat()
	if err != nil {
		return err
	}
	return RegionsIn(out, in, 0, st.Size())
}

// RegionsIn is Regions for the bytes of in from off up to size.
func RegionsIn(out, in *os.File, off, size int64) error {
	for off < size {
		start, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole remains
		}
		if err != nil {
			return Range(out, in, off, off, size-off)
		}
		if start >= size {
			return nil
		}
		end, err := unix.Seek(int(in.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			end = size
		}
		end = min(end, size)
		if err := Range(out, in, start, start, end-start); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// Range copies n bytes of in at roff to out at woff, in the kernel when
// it can.
func Range(out, in *os.File, woff, roff, n int64) error {
	for n > 0 {
		r, w := roff, woff
		c, err := unix.CopyFileRange(int(in.Fd()), &r, int(out.Fd()), &w, int(min(n, 1<<30)), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
				_, err := io.CopyN(io.NewOffsetWriter(out, woff), io.NewSectionReader(in, roff, n), n)
				return err
			}
			return err
		}
		if c == 0 {
			return io.ErrUnexpectedEOF
		}
		roff, woff, n = roff+int64(c), woff+int64(c), n-int64(c)
	}
	return nil
}

// Atomic copies src to dst so that dst is never seen half-written: the
// copy is made in an unnamed file in dst's directory (O_TMPFILE, which
// vanishes if kiln is killed) and given its name once complete. An
// existing dst is replaced.
func Atomic(src, dst string, perm os.FileMode) error { return AtomicThen(src, dst, perm, nil) }

// AtomicThen is Atomic with a last step: finish, if set, gets the copy
// (open for reading and writing) before it is named.
func AtomicThen(src, dst string, perm os.FileMode, finish func(*os.File) error) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return Write(dst, perm, func(out *os.File) error {
		if err := Into(out, in); err != nil {
			return err
		}
		if finish != nil {
			return finish(out)
		}
		return nil
	})
}

// Write creates dst as fill writes it, so that dst is never seen
// half-written: fill gets an empty file in dst's directory, open for
// reading and writing, which is given dst's name (replacing any file
// there) only if fill succeeds. The file is unnamed while fill runs
// (O_TMPFILE) where the filesystem allows, so a killed kiln leaves
// nothing behind.
func Write(dst string, perm os.FileMode, fill func(*os.File) error) error {
	dir := filepath.Dir(dst)
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return writeNamed(dst, perm, fill)
	}
	out := os.NewFile(uintptr(fd), dst)
	defer out.Close()
	if err := fill(out); err != nil {
		return err
	}
	if err := out.Chmod(perm); err != nil {
		return err
	}
	// A name, then the final name: linkat cannot replace an existing file.
	tmp := tempName(dst)
	if err := unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", fd), unix.AT_FDCWD, tmp, unix.AT_SYMLINK_FOLLOW); err != nil {
		return fmt.Errorf("naming %s: %w", dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// writeNamed is Write for filesystems without O_TMPFILE: a named
// temporary file, renamed into place.
func writeNamed(dst string, perm os.FileMode, fill func(*os.File) error) error {
	name := tempName(dst)
	tmp, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = fill(tmp)
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(name, dst)
	}
	if err != nil {
		os.Remove(name)
	}
	return err
}

// Reflink makes dst, which must not exist, share src's blocks, and fails
// with ErrNoReflink where the filesystem cannot (ext4, or src and dst on
// different filesystems) rather than copy.
func Reflink(src, dst string, perm os.FileMode) error {
	return create(src, dst, perm, func(out, in *os.File) error {
		if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
			return fmt.Errorf("%w: %w", ErrNoReflink, err)
		}
		return nil
	})
}

// ErrNoReflink is wrapped by Reflink when the filesystem cannot share
// blocks between the two files.
var ErrNoReflink = errors.New("the filesystem cannot share blocks")

func tempName(dst string) string {
	var b [6]byte
	rand.Read(b[:]) //nolint:errcheck // never fails
	return filepath.Join(filepath.Dir(dst), fmt.Sprintf(".%s.kiln-%x", filepath.Base(dst), b))
}
