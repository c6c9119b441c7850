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

// Images are built without waiting for the disk (build.Options.NoSync): an
// export or a VM wants the image now, and the disk can follow. kiln syncs
// an image a while after building it rather than at once: forcing a few
// hundred megabytes out right away would stall every other metadata sync
// on the filesystem (containerd's and kiln's databases) behind it, in the
// middle of the pull that wants the image.
//
// Until the image is synced, a file beside it holds the boot ID. At
// startup, such an image from an earlier boot may have been torn by the
// crash and is removed (it is rebuilt from the stored layers when next
// needed); one from this boot (kiln alone restarted) is whole in the page
// cache and is synced.

// bootIDFile identifies the running boot of the machine.
const bootIDFile = "/proc/sys/kernel/random/boot_id"

func bootID() []byte {
	b, _ := os.ReadFile(bootIDFile)
	return bytes.TrimSpace(b)
}

// markUnsynced records, before an image gets its name, that it is not on
// the disk yet.
func markUnsynced(path string) error {
	return os.WriteFile(path, append(bootID(), '\n'), 0o600)
}

// syncDelay is how long after its build an image is synced.
const syncDelay = 10 * time.Second

// syncLater makes an image durable after syncDelay and then drops its
// mark. Closing the builder syncs at once and waits for it.
func (b *imageBuilder) syncLater(image, mark string) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		select {
		case <-time.After(syncDelay):
		case <-b.ctx.Done():
		}
		if err := syncImage(image, mark); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(b.ctx).WithError(err).WithField("image", image).Warn("syncing image")
		}
	}()
}

func syncImage(image, mark string) error {
	f, err := os.Open(image)
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

// settleUnsynced deals with the images a previous run left unsynced.
func (b *imageBuilder) settleUnsynced(ctx context.Context) {
	marks, _ := filepath.Glob(filepath.Join(b.s.root, "snapshots", "*", unsyncedFile))
	now := bootID()
	for _, mark := range marks {
		image := filepath.Join(filepath.Dir(mark), imageFile)
		then, err := os.ReadFile(mark)
		if err == nil && len(now) > 0 && bytes.Equal(bytes.TrimSpace(then), now) {
			if err := syncImage(image, mark); err == nil || errors.Is(err, os.ErrNotExist) {
				os.Remove(mark)
				continue
			}
		}
		log.G(ctx).WithField("image", image).Info("removing an image that did not reach the disk before a crash; it is rebuilt when needed")
		if err := os.Remove(image); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("image", image).Warn("removing unsynced image")
			continue
		}
		os.Remove(mark)
	}
}
