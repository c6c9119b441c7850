package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/fstree"
)

// How kiln's differ keeps a layer. A layer whose parent was kept the same
// way (or that has none) is kept as fstree.StoreLayer keeps it: its
// contents in layerData, where the disk of its chain has them, and its
// entries in layerRecord. The disk of the image whose top it is is then
// built in that data file (build.Request.TakeTop): the top layer's
// contents are written once, and the file becomes disk.ext4, where the
// contents stay at the same places for the layers above. A disk that
// holds its layer's data is never just deleted: it goes back to being
// the data file (see demote).
//
// A layer on another kind of parent (a container's commit, a layer
// containerd's own differ wrote) is kept as its uncompressed tar, as
// earlier kilns kept every layer.

// StoreLayer keeps the layer of extraction snapshot directory dir, the
// uncompressed tar r, named name in errors. diffID is called once r is
// read to its end and gives the layer's digest. It returns the tar's
// size. With syncFs the layer reaches stable storage before it returns.
func (s *Snapshotter) StoreLayer(ctx context.Context, dir string, r io.Reader, name string, limits fstree.Limits,
	syncFs bool, diffID func() (digest.Digest, error)) (int64, error) {
	id := filepath.Base(dir)
	parents, err := s.parentsOf(ctx, id)
	if err != nil {
		return 0, err
	}
	start := int64(0)
	if len(parents) > 0 {
		st, err := fstree.ReadStored(filepath.Join(s.dir(parents[0]), layerRecord))
		if errors.Is(err, os.ErrNotExist) {
			return storeTar(ctx, dir, r, name, limits, syncFs, diffID)
		}
		if err != nil {
			return 0, fmt.Errorf("the parent layer of snapshot %s: %w", id, err)
		}
		start = st.End
	}

	dataTmp, recordTmp := filepath.Join(dir, layerData+".tmp"), filepath.Join(dir, layerRecord+".tmp")
	mark := filepath.Join(dir, dataUnsyncedFile)
	ok := false
	defer func() {
		if !ok {
			os.Remove(dataTmp)
			os.Remove(recordTmp)
			os.Remove(mark)
		}
	}()
	data, err := os.OpenFile(dataTmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer data.Close()
	record, err := os.OpenFile(recordTmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer record.Close()
	st, err := fstree.StoreLayer(ctx, r, name, limits, start, data, record)
	if err != nil {
		// The tree the parent left would have gone to this layer; a
		// pull that tries again replays the parent.
		if len(parents) > 0 {
			s.staged.drop(parents[0])
		}
		return 0, err
	}
	if syncFs {
		if err := data.Sync(); err != nil {
			return 0, err
		}
	} else if err := markUnsynced(mark); err != nil {
		// Synced a while later, as disks are (see durable.go).
		return 0, err
	}
	// The record, small, always: a crash must not leave one that says
	// less than it did (see demote).
	if err := record.Sync(); err != nil {
		return 0, err
	}
	if err := errors.Join(data.Close(), record.Close()); err != nil {
		return 0, err
	}
	if err := writeDiffID(dir, diffID); err != nil {
		return 0, err
	}
	// The record comes last: it says the layer is whole.
	if err := os.Rename(dataTmp, filepath.Join(dir, layerData)); err != nil {
		return 0, err
	}
	if err := os.Rename(recordTmp, filepath.Join(dir, layerRecord)); err != nil {
		return 0, err
	}
	ok = true
	if !syncFs {
		s.disks.syncLayerLater(dir)
	}
	if err := s.stageStored(ctx, dir, parents, name); err != nil {
		for _, f := range []string{layerRecord, layerData, diffIDFile} {
			os.Remove(filepath.Join(dir, f))
		}
		return 0, err
	}
	return st.Bytes, nil
}

// stageStored replays a just stored layer into the tree its parent left,
// if there is one, for the disk's build; replaying also runs the checks
// that need the layers below, so a bad layer fails now.
func (s *Snapshotter) stageStored(ctx context.Context, dir string, parents []string, name string) error {
	sink := s.staged.stage(filepath.Join(s.root, tmpDir), filepath.Base(dir), parents)
	if sink == nil {
		return nil
	}
	f, err := os.Open(filepath.Join(dir, layerRecord))
	if err != nil {
		sink.Done(false)
		return err
	}
	defer f.Close()
	err = sink.tree.tree.ApplyStoredLayer(ctx, f, name, dataPaths(dir)...)
	sink.Done(err == nil)
	return err
}

// dataPaths are where a stored layer's data file is, in the order it
// moves (see fstree.Tree.OpenData).
func dataPaths(dir string) []string {
	return []string{filepath.Join(dir, layerData), filepath.Join(dir, diskBuilding), filepath.Join(dir, diskFile)}
}

// storeTar keeps a layer as its uncompressed tar.
func storeTar(ctx context.Context, dir string, r io.Reader, name string, limits fstree.Limits,
	syncFs bool, diffID func() (digest.Digest, error)) (_ int64, err error) {
	tarPath := filepath.Join(dir, layerTar)
	tmp := tarPath + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	counter := &countingWriter{w: f}
	if err := fstree.Check(ctx, io.TeeReader(r, counter), name, limits); err != nil {
		return 0, err
	}
	// The tar reader stops at the end marker; the rest (padding) is part
	// of the layer and of its digest.
	if _, err := io.Copy(counter, r); err != nil {
		return 0, err
	}
	if syncFs {
		if err := f.Sync(); err != nil {
			return 0, err
		}
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	if err := writeDiffID(dir, diffID); err != nil {
		return 0, err
	}
	return counter.n, os.Rename(tmp, tarPath)
}

// writeDiffID records the digest of a layer read to its end.
func writeDiffID(dir string, diffID func() (digest.Digest, error)) error {
	d, err := diffID()
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, diffIDFile), []byte(d.String()+"\n"), 0o600)
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// parentsOf returns the ids of a snapshot's parents, nearest first.
func (s *Snapshotter) parentsOf(ctx context.Context, id string) ([]string, error) {
	var parents []string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		key, ok := ids[id]
		if !ok {
			return fmt.Errorf("snapshot %s not found", id)
		}
		snap, err := storage.GetSnapshot(ctx, key)
		parents = snap.ParentIDs
		return err
	})
	return parents, err
}

// holdsData reports whether the disk of snapshot directory dir is also
// its layer's data file.
func holdsData(dir string) bool {
	return exists(filepath.Join(dir, layerRecord)) && !exists(filepath.Join(dir, layerData))
}

// dropDisk removes the disk of snapshot directory dir, or, when it holds
// the layer's data, turns it back into the data file. With copy set (a
// VM of an earlier kiln may still read the disk) the data is copied out
// of it rather than renamed, so that a later build in the data file
// never changes what the VM reads.
func dropDisk(dir string, copyOut bool) error {
	if err := demote(dir, copyOut); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, unsyncedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func demote(dir string, copyOut bool) error {
	disk := filepath.Join(dir, diskFile)
	if !holdsData(dir) {
		if err := os.Remove(disk); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	st, err := fstree.ReadStored(filepath.Join(dir, layerRecord))
	if err != nil {
		return err
	}
	data := filepath.Join(dir, layerData)
	if !copyOut {
		if err := os.Rename(disk, data); err != nil {
			return err
		}
		return keepOwn(data, st)
	}
	tmp := data + ".tmp"
	if err := copyOwn(disk, tmp, st); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, data); err != nil {
		return err
	}
	return os.Remove(disk)
}

// keepOwn frees everything of a data file but the layer's own data
// space: what a disk built in it, or a build that failed, added.
func keepOwn(path string, st fstree.StoredLayer) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(st.End); err != nil {
		return err
	}
	if st.Start > 0 {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, st.Start); err != nil {
			return err
		}
	}
	return os.Chmod(path, 0o600)
}

// copyOwn copies a layer's own data space from a disk into a new file.
func copyOwn(from, to string, st fstree.StoredLayer) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(st.End); err != nil {
		return err
	}
	if err := clone.RegionsIn(out, in, st.Start, st.End); err != nil {
		return err
	}
	return out.Sync()
}
