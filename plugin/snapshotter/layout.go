package snapshotter

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
)

// Files and directories of a snapshot directory (snapshots/<id>/).
//
// An extraction snapshot (a layer being unpacked) holds:
//
//	layer         marker: kiln's differ recognises the snapshot by it
//	fs/, work/    the overlay upper and work directories that containerd's
//	              walking differ fills when it is used instead of kiln's
//	data          the contents of the layer's files, as kiln's differ
//	              stored them (see store.go)
//	layer.record  its entries
//	layer.tar     or instead of those two, the layer uncompressed
//	diffid        its digest
//
// A committed snapshot may also hold its disk: the ext4 with the
// filesystem of its whole chain, built once and shared read-only by every
// container and view on it. It may have been built in the data file,
// which it then replaces.
//
//	disk.building  the disk while it gets its name
//	disk.ext4      the disk
//	disk.unsynced  present until the disk has reached stable storage
//
// A container holds its own writable part, by container mode:
//
//	scratch.ext4    overlay mode: a small ext4 whose upper/ and work/
//	                overlay the parent's disk
//	container.ext4  copy mode: a whole bootable copy of the parent's disk
//
// and, in block-device mode, loop.<role> records of the loop devices kiln
// attached for it (see loops).
const (
	layerMarker  = "layer"
	upperDir     = "fs"
	workDir      = "work"
	layerTar     = "layer.tar"
	layerData    = "data"
	layerRecord  = "layer.record"
	diskBuilding = "disk.building"
	// dataUnsyncedFile is present until a layer's data has reached
	// stable storage (see durable.go).
	dataUnsyncedFile = "data.unsynced"
	diffIDFile       = "diffid"
	diskFile         = "disk.ext4"
	unsyncedFile     = "disk.unsynced"
	scratchFile      = "scratch.ext4"
	containerFile    = "container.ext4"
)

// Directories under the root.
const (
	snapshotsDir = "snapshots"
	tmpDir       = "tmp"
	emptyDir     = "empty"
	templatesDir = "templates"
	// removingPrefix marks a snapshot directory being deleted: renamed in
	// the transaction that removes the snapshot, deleted after it.
	removingPrefix = "rm-"
)

// kind is what a snapshot directory holds.
type kind int

const (
	kindNone    kind = iota
	kindLayer        // an extraction snapshot, stored or being stored
	kindOverlay      // an overlay-mode container (active or committed)
	kindCopy         // a copy-mode container (active or committed)
)

func dirKind(dir string) kind {
	switch {
	case exists(filepath.Join(dir, layerMarker)):
		return kindLayer
	case exists(filepath.Join(dir, scratchFile)):
		return kindOverlay
	case exists(filepath.Join(dir, containerFile)):
		return kindCopy
	}
	return kindNone
}

// migrateLayout brings the snapshot directories of an earlier kiln to
// this layout: its rootfs.ext4 (a container) is now container.ext4; its
// image.ext4 was built the way that kiln built disks and is removed (it
// is built again when needed).
func migrateLayout(root string) error {
	dirs, err := filepath.Glob(filepath.Join(root, snapshotsDir, "*"))
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		if err := os.Rename(filepath.Join(dir, "rootfs.ext4"), filepath.Join(dir, containerFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		for _, old := range []string{"image.ext4", "image.unsynced"} {
			if err := os.Remove(filepath.Join(dir, old)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		if err := adoptLoop(dir); err != nil {
			return err
		}
	}
	return nil
}

// disksKeyFile records what the disks under the root were built with.
const disksKeyFile = "disks.key"

// dropStaleDisks removes every disk when they were built with other
// options than key says (another size, other guest pieces, another
// format): disks are derived, and each is built again when needed. A
// disk a container or VM still has open stays readable to it.
func dropStaleDisks(root, key string) error {
	p := filepath.Join(root, disksKeyFile)
	old, err := os.ReadFile(p)
	if err == nil && strings.TrimSpace(string(old)) == key {
		return nil
	}
	disks, _ := filepath.Glob(filepath.Join(root, snapshotsDir, "*", diskFile))
	for _, d := range disks {
		// Copied out of the disk, which a VM of the earlier kiln may
		// still read; in place if that fails (no room for a copy).
		if err := dropDisk(filepath.Dir(d), true); err != nil {
			if err := dropDisk(filepath.Dir(d), false); err != nil {
				return err
			}
		}
	}
	// Replaced whole: a kill while writing it must not leave a key that
	// matches nothing (every disk would be dropped at the next start).
	tmp := p + ".new"
	if err := os.WriteFile(tmp, []byte(key+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// adoptLoop renames the one "loop" record an earlier kiln kept and marks
// its device as kiln's (see loops).
func adoptLoop(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "loop"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	role := loopDisk
	if exists(filepath.Join(dir, containerFile)) {
		role = loopContainer
	}
	dev := strings.TrimSpace(string(b))
	if f, err := os.Open(dev); err == nil {
		if strings.HasPrefix(backingFile(dev), filepath.Dir(dir)+string(os.PathSeparator)) {
			setMark(f, loopMark(dir, role)) //nolint:errcheck // unmarked, it is left attached
		}
		f.Close()
	}
	return os.Rename(filepath.Join(dir, "loop"), loopRecord(dir, role))
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
