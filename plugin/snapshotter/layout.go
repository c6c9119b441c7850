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
//	layer        marker: kiln's differ recognises the snapshot by it
//	namespace    the containerd namespace it was made in
//	fs/, work/   the overlay upper and work directories that containerd's
//	             walking differ fills when it is used instead of kiln's
//	layer.tar    the layer, uncompressed, as kiln's differ stored it
//	diffid       its digest
//
// A committed snapshot may also hold its disk: the ext4 with the
// filesystem of its whole chain, built once and shared read-only by every
// container and view on it.
//
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
	layerMarker   = "layer"
	namespaceFile = "namespace"
	upperDir      = "fs"
	workDir       = "work"
	layerTar      = "layer.tar"
	diffIDFile    = "diffid"
	diskFile      = "disk.ext4"
	unsyncedFile  = "disk.unsynced"
	scratchFile   = "scratch.ext4"
	containerFile = "container.ext4"
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

// migrateLayout renames the files of snapshot directories that an earlier
// kiln wrote under other names: image.ext4 (now disk.ext4, with its
// image.unsynced mark) and rootfs.ext4 (now container.ext4, a copy-mode
// container).
func migrateLayout(root string) error {
	dirs, err := filepath.Glob(filepath.Join(root, snapshotsDir, "*"))
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		for old, now := range map[string]string{
			"image.ext4":     diskFile,
			"image.unsynced": unsyncedFile,
			"rootfs.ext4":    containerFile,
		} {
			if err := os.Rename(filepath.Join(dir, old), filepath.Join(dir, now)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		if err := adoptLoop(dir); err != nil {
			return err
		}
	}
	return nil
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
