package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
)

// Disks are built without waiting for stable storage (build.Options.NoSync):
// an export or a VM wants the disk now, and the storage can follow. kiln
// syncs a disk a while after building it rather than at once: forcing a
// few hundred megabytes out right away would stall every other metadata
// sync on the filesystem (containerd's and kiln's databases) behind it,
// in the middle of the pull that wants the disk.
//
// Until the disk is synced, a file beside it holds the boot ID. At
// startup, such a disk from an earlier boot may have been torn by the
// crash and is removed (it is rebuilt from the stored layers when next
// needed); one from this boot (kiln alone restarted) is whole in the page
// cache and is synced.

// bootIDFile identifies the running boot of the machine.
const bootIDFile = "/proc/sys/kernel/random/boot_id"

func bootID() []byte {
	b, _ := os.ReadFile(bootIDFile)
	return bytes.TrimSpace(b)
}

// markUnsynced records, before a disk gets its name, that it is not on
// stable storage yet.
func markUnsynced(path string) error {
	return os.WriteFile(path, append(bootID(), '\n'), 0o600)
}

// syncDelay is how long after its build a disk is synced.
const syncDelay = 10 * time.Second

// syncLater makes a disk durable after syncDelay and then drops its
// mark. Closing the builder syncs at once and waits for it.
func (b *diskBuilder) syncLater(disk, mark string) {
	b.later("disk", disk, func() error { return syncDisk(disk, mark) })
}

// later runs sync, which makes the file of a kind durable, after
// syncDelay, or at once when the builder closes, which waits for it.
func (b *diskBuilder) later(kind, path string, sync func() error) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		select {
		case <-time.After(syncDelay):
		case <-b.ctx.Done():
		}
		if err := sync(); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(b.ctx).WithError(err).WithField(kind, path).Warn("syncing " + kind)
		}
	}()
}

func syncDisk(disk, mark string) error {
	f, err := os.Open(disk)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Remove(mark)
}

// syncLayerLater makes a just stored layer's data durable after
// syncDelay, wherever it is by then (see dataPaths), and drops its mark.
func (b *diskBuilder) syncLayerLater(dir string) {
	b.later("layer", dir, func() error { return syncLayer(dir) })
}

func syncLayer(dir string) error {
	for _, p := range dataPaths(dir) {
		err := syncDisk(p, filepath.Join(dir, dataUnsyncedFile))
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return os.ErrNotExist
}

// unsyncedEarlierBoot says whether an unsynced mark was left by an
// earlier boot of the machine (or cannot tell).
func unsyncedEarlierBoot(mark string) bool {
	then, err := os.ReadFile(mark)
	now := bootID()
	return err != nil || len(now) == 0 || !bytes.Equal(bytes.TrimSpace(then), now)
}

// settleUnsynced deals with the disks a previous run left unsynced.
func (b *diskBuilder) settleUnsynced(ctx context.Context) {
	now := bootID()
	layerMarks, _ := filepath.Glob(filepath.Join(b.root, snapshotsDir, "*", dataUnsyncedFile))
	for _, mark := range layerMarks {
		// From an earlier boot, the layer stays marked: its data may be
		// torn, and its chain reports it lost (see chainLayers).
		if !unsyncedEarlierBoot(mark) {
			if err := syncLayer(filepath.Dir(mark)); err != nil && !errors.Is(err, os.ErrNotExist) {
				log.G(ctx).WithError(err).WithField("layer", filepath.Dir(mark)).Warn("syncing a layer's data")
			}
		}
	}
	marks, _ := filepath.Glob(filepath.Join(b.root, snapshotsDir, "*", unsyncedFile))
	for _, mark := range marks {
		disk := filepath.Join(filepath.Dir(mark), diskFile)
		then, err := os.ReadFile(mark)
		if err == nil && len(now) > 0 && bytes.Equal(bytes.TrimSpace(then), now) {
			if err := syncDisk(disk, mark); err == nil || errors.Is(err, os.ErrNotExist) {
				os.Remove(mark)
				continue
			}
		}
		log.G(ctx).WithField("disk", disk).Info("removing a disk that did not reach stable storage before a crash; it is rebuilt when needed")
		// A disk holding its layer's data becomes the data file again:
		// in place after a reboot, when nothing has it open; copied out
		// otherwise, since a VM may still read it.
		if err := dropDisk(filepath.Dir(mark), !unsyncedEarlierBoot(mark)); err != nil {
			log.G(ctx).WithError(err).WithField("disk", disk).Warn("removing unsynced disk")
		}
	}
}
