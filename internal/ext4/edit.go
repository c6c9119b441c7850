package ext4

import (
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Format makes an empty ext4 filesystem of size bytes in a new sparse file
// at path, with the feature set kiln builds with, the given volume label,
// and a UUID and hash seed derived from identity. Only metadata is
// written: the file costs a few hundred KiB of disk whatever its size.
func Format(ctx context.Context, file string, size int64, label, identity, workDir string) error {
	size = size / BlockSize * BlockSize
	if size < 4<<20 {
		return fmt.Errorf("ext4: %d bytes is too small for a filesystem", size)
	}
	conf := filepath.Join(workDir, "mke2fs.conf")
	if err := os.WriteFile(conf, []byte(mke2fsConfig), 0o644); err != nil {
		return err
	}
	if err := sizeFile(file, os.O_CREATE|os.O_EXCL, size); err != nil {
		os.Remove(file)
		return err
	}
	args := []string{
		"-t", "ext4", "-F", "-q",
		"-b", strconv.Itoa(BlockSize), "-I", "256", "-m", "0",
		// Checksums right away: nothing is added afterwards that would
		// make building without them faster.
		"-O", "^uninit_bg,metadata_csum",
		"-U", DeriveUUID("kiln.fs-uuid", identity),
		"-E", "hash_seed=" + DeriveUUID("kiln.hash-seed", identity) + ",root_owner=0:0,nodiscard,assume_storage_prezeroed=1",
	}
	if label != "" {
		args = append(args, "-L", label)
	}
	cmd := tool(ctx, "mke2fs", append(args, file, strconv.FormatInt(size/BlockSize, 10))...)
	cmd.Env = append(fixedEnv(time.Unix(1, 0)), "MKE2FS_CONFIG="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(file)
		return fmt.Errorf("mke2fs: %w: %s", err, strings.TrimSpace(string(out)))
	}
	// An empty filesystem is empty: kiln leaves out the /lost+found that
	// mke2fs makes, as for its images (e2fsck makes one when it needs it).
	var s script
	s.printf("rmdir /lost+found")
	if _, err := debugfs(ctx, file, workDir, &s, fixedEnv(time.Unix(1, 0))); err != nil {
		os.Remove(file)
		return err
	}
	return nil
}

// sizeFile opens path with flag (and O_WRONLY) and makes it size bytes
// long: a sparse file for a filesystem to be made in.
func sizeFile(path string, flag int, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|flag, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Entry is a directory or a regular file to add to an existing image.
type Entry struct {
	// Path is absolute in the filesystem.
	Path string
	// Dir makes a directory (left as it is if it exists); otherwise the
	// entry is a regular file holding Data, replacing any file there.
	Dir  bool
	Data []byte
	// Mode holds the permission bits; UID and GID the owner; Time is
	// given to atime, mtime and ctime.
	Mode     uint32
	UID, GID uint32
	Time     time.Time
}

// Add writes entries, parents first, into an existing image (open for
// reading and writing) with debugfs. debugfs runs with a fixed clock (the
// first entry's time), so that the same image and entries give the same
// bytes.
func Add(ctx context.Context, image *os.File, workDir string, entries []Entry) error {
	if len(entries) == 0 {
		return nil
	}
	im, err := readImage(image)
	if err != nil {
		return fmt.Errorf("%s: %w", image.Name(), err)
	}
	var s script
	dirs := map[string]bool{} // directories whose times the script resets
	for i, e := range entries {
		p := path.Clean(e.Path)
		if !path.IsAbs(p) || p == "/" {
			im.Close()
			return fmt.Errorf("ext4: cannot add %q: want an absolute path below /", e.Path)
		}
		qp, err := quote(p)
		if err != nil {
			im.Close()
			return err
		}
		_, typ, found, err := im.Lookup(p)
		if err != nil {
			im.Close()
			return err
		}
		if e.Dir {
			if found && typ != 2 {
				im.Close()
				return fmt.Errorf("ext4: cannot add directory %s: a file is there", p)
			}
			if !found {
				s.printf("mkdir %s", qp)
				s.printf("sif %s mode 0%o", qp, 0o040000|e.Mode)
				s.printf("sif %s uid %d", qp, e.UID)
				s.printf("sif %s gid %d", qp, e.GID)
				s.setAllTimes(qp, e.Time)
				dirs[path.Dir(p)] = true
			}
			continue
		}
		if found && typ == 2 {
			im.Close()
			return fmt.Errorf("ext4: cannot add file %s: a directory is there", p)
		}
		src := filepath.Join(workDir, fmt.Sprintf("add-%d", i))
		if err := os.WriteFile(src, e.Data, 0o600); err != nil {
			im.Close()
			return err
		}
		qsrc, err := quote(src)
		if err != nil {
			im.Close()
			return err
		}
		qdir, _ := quote(path.Dir(p))
		qname, _ := quote(path.Base(p))
		if found {
			s.printf("rm %s", qp)
		}
		s.printf("cd %s", qdir)
		s.printf("write %s %s", qsrc, qname)
		s.printf("cd /")
		s.printf("sif %s mode 0%o", qp, 0o100000|e.Mode)
		s.printf("sif %s uid %d", qp, e.UID)
		s.printf("sif %s gid %d", qp, e.GID)
		s.setAllTimes(qp, e.Time)
		dirs[path.Dir(p)] = true
	}
	im.Close()
	when := entries[0].Time
	for d := range dirs {
		q, _ := quote(d)
		s.printf("sif %s mtime_lo 0x%x", q, uint32(when.Unix()))
		s.printf("sif %s ctime_lo 0x%x", q, uint32(when.Unix()))
	}
	_, err = debugfsOn(ctx, image.Name(), image, workDir, &s, fixedEnv(when))
	return err
}

// setAllTimes sets atime, mtime and ctime (seconds and extra fields).
func (s *script) setAllTimes(q string, t time.Time) {
	lo, extra := EncodeTime(t)
	for _, f := range []string{"atime", "mtime", "ctime"} {
		s.printf("sif %s %s_lo 0x%x", q, f, lo)
		s.printf("sif %s %s_hi 0x%x", q, f, extra)
	}
}

// fixedEnv is the environment for e2fsprogs runs that must not depend on
// the host or the time.
func fixedEnv(now time.Time) []string {
	fake := strconv.FormatInt(max(now.Unix(), 1), 10) // e2fsprogs reads 0 as "unset"
	return []string{
		"PATH=" + os.Getenv("PATH"),
		"LC_ALL=C",
		"TZ=UTC",
		"POSIXLY_CORRECT=1", // debugfs options end at the first name
		"E2FSPROGS_FAKE_TIME=" + fake,
		"E2FSPROGS_LIBMAGIC_SUPPRESS=1",
	}
}

// Has reports whether an image has a regular file at p and its size.
func Has(image *os.File, p string) (found bool, size int64, err error) {
	im, err := readImage(image)
	if err != nil {
		return false, 0, fmt.Errorf("%s: %w", image.Name(), err)
	}
	defer im.Close()
	ino, typ, ok, err := im.Lookup(p)
	if err != nil || !ok || typ != 1 {
		return false, 0, err
	}
	raw, err := im.inode(ino)
	if err != nil {
		return false, 0, err
	}
	return true, int64(decodeInode(raw).size), nil
}
