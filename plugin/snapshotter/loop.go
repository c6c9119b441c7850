package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
)

// loops manages the loop devices of block-device mode: each snapshot
// records the device attached for it in its directory, so the device
// survives a restart of kiln (a VM may be using it) and is detached when
// the snapshot goes.
type loops struct{ mu sync.Mutex }

// attach returns the loop device for file, attaching one if the snapshot
// has none.
func (l *loops) attach(ctx context.Context, dir, file string, readOnly bool) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	record := filepath.Join(dir, loopFile)
	if b, err := os.ReadFile(record); err == nil {
		dev := strings.TrimSpace(string(b))
		if backingFile(dev) == file {
			return dev, nil
		}
	}
	f, err := mount.SetupLoop(file, mount.LoopParams{Readonly: readOnly})
	if err != nil {
		return "", fmt.Errorf("attaching a loop device to %s: %w", file, err)
	}
	dev := f.Name()
	f.Close()
	if err := os.WriteFile(record, []byte(dev+"\n"), 0o600); err != nil {
		mount.DetachLoopDevice(dev)
		return "", err
	}
	log.G(ctx).WithFields(log.Fields{"device": dev, "file": file}).Debug("attached loop device")
	return dev, nil
}

// detachDir detaches the device a snapshot directory records, if it is
// still backed by a file of kiln's.
func (l *loops) detachDir(ctx context.Context, dir string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, err := os.ReadFile(filepath.Join(dir, loopFile))
	if err != nil {
		return
	}
	dev := strings.TrimSpace(string(b))
	if backingFile(dev) == "" {
		return
	}
	if err := mount.DetachLoopDevice(dev); err != nil {
		log.G(ctx).WithError(err).WithField("device", dev).Warn("failed to detach loop device")
	}
}

// detachStale detaches loop devices backed by files under root that no
// snapshot directory records, but for directories being removed (rm-*).
func (l *loops) detachStale(ctx context.Context, root string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	recorded := map[string]bool{}
	dirs, _ := filepath.Glob(filepath.Join(root, "snapshots", "*"))
	for _, d := range dirs {
		if strings.HasPrefix(filepath.Base(d), "rm-") {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(d, loopFile)); err == nil {
			recorded[strings.TrimSpace(string(b))] = true
		}
	}
	devs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	prefix := filepath.Clean(root) + string(os.PathSeparator)
	for _, p := range devs {
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p)))
		if f := backingFile(dev); strings.HasPrefix(f, prefix) && !recorded[dev] {
			if err := mount.DetachLoopDevice(dev); err != nil {
				log.G(ctx).WithError(err).WithField("device", dev).Warn("failed to detach stale loop device")
			} else {
				log.G(ctx).WithFields(log.Fields{"device": dev, "file": f}).Info("detached stale loop device")
			}
		}
	}
}

// backingFile returns the file behind a loop device ("" if none).
func backingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
}
