package snapshotter

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// What kiln's differ needs to know about kiln's mounts.

// ExtractionDir returns the directory of the extraction snapshot that
// mounts describe, if they are one of this snapshotter's: one overlay
// mount whose upper directory is the fs/ of a snapshot directory holding
// the layer marker.
func (s *Snapshotter) ExtractionDir(mounts []mount.Mount) (string, bool) {
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		return "", false
	}
	for _, o := range mounts[0].Options {
		upper, ok := strings.CutPrefix(o, "upperdir=")
		if !ok {
			continue
		}
		dir := filepath.Dir(filepath.Clean(upper))
		if filepath.Dir(dir) != filepath.Join(s.root, snapshotsDir) || filepath.Base(upper) != upperDir ||
			strings.HasPrefix(filepath.Base(dir), removingPrefix) {
			return "", false
		}
		if dirKind(dir) != kindLayer {
			return "", false
		}
		return dir, true
	}
	return "", false
}

// Disks is what a set of kiln's mounts shows, in files.
type Disks struct {
	// Disk is a read-only disk: a view's, or the one under an
	// overlay-mode container.
	Disk string
	// Scratch is an overlay-mode container's scratch disk.
	Scratch string
	// Container is a copy-mode container's disk.
	Container string
}

// ResolveDisks recognises mounts this snapshotter handed out (none at
// all stands for an empty filesystem) and returns their files.
func (s *Snapshotter) ResolveDisks(mounts []mount.Mount) (Disks, bool) {
	switch len(mounts) {
	case 0:
		return Disks{}, true
	case 1:
		file, ok := s.diskFile(mounts[0])
		if !ok {
			return Disks{}, false
		}
		switch filepath.Base(file) {
		case containerFile:
			return Disks{Container: file}, true
		case diskFile, "empty.ext4":
			return Disks{Disk: file}, true
		}
	case 3:
		scratch, ok1 := s.diskFile(mounts[0])
		disk, ok2 := s.diskFile(mounts[1])
		if ok1 && ok2 && mounts[2].Type == "format/mkdir/overlay" &&
			filepath.Base(scratch) == scratchFile && filepath.Base(disk) == diskFile {
			return Disks{Disk: disk, Scratch: scratch}, true
		}
	}
	return Disks{}, false
}

// diskFile returns the disk of kiln's that an ext4 mount is of, directly
// or through a loop device: a snapshot directory's disk.ext4,
// scratch.ext4 or container.ext4, a lazily loaded disk, or the empty
// disk, and nothing else.
func (s *Snapshotter) diskFile(m mount.Mount) (string, bool) {
	if m.Type != "ext4" && m.Type != "format/ext4" {
		return "", false
	}
	file := m.Source
	if strings.HasPrefix(file, "/dev/loop") {
		file = backingFile(file)
	}
	file = filepath.Clean(file)
	if file == filepath.Join(s.root, "empty.ext4") {
		return file, true
	}
	dir, name := filepath.Split(file)
	if filepath.Dir(filepath.Clean(dir)) == filepath.Join(s.root, lazyDir) && name == diskFile {
		if fi, err := os.Lstat(file); err == nil && fi.Mode().IsRegular() {
			return file, true
		}
		return "", false
	}
	if filepath.Dir(filepath.Clean(dir)) != filepath.Join(s.root, snapshotsDir) ||
		strings.HasPrefix(filepath.Base(dir), removingPrefix) {
		return "", false
	}
	switch name {
	case diskFile, scratchFile, containerFile:
		if fi, err := os.Lstat(file); err == nil && fi.Mode().IsRegular() {
			return file, true
		}
	}
	return "", false
}

// DiskInUse says why a container's disk is in use, or returns "" when it
// is not known to be: a loop device somebody else attached is backed by
// it (containerd's mount manager, for runc), one kiln attached is mounted
// or held open exclusively, or a process holds a lock on the disk or on
// kiln's device (QEMU and Cloud Hypervisor lock the disks they open; a
// VMM that takes no lock, such as Firecracker, goes unnoticed).
func DiskInUse(file string) string {
	for _, dev := range loopUsers(file) {
		if !strings.HasPrefix(deviceMark(dev), loopMarkPrefix) {
			return fmt.Sprintf("loop device %s is attached to it", dev)
		}
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL, 0)
		if err != nil {
			return fmt.Sprintf("its loop device %s is busy", dev)
		}
		f.Close()
		if locked(dev) {
			return fmt.Sprintf("a process holds a lock on its loop device %s", dev)
		}
	}
	if locked(file) {
		return "a process holds a lock on it"
	}
	return ""
}

// locked says whether a process holds a POSIX or OFD lock over any part
// of a file. It only asks: taking a lock, even briefly, could make a VMM
// starting at that moment fail to get its own.
func locked(file string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	return unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk) == nil && lk.Type != unix.F_UNLCK
}
