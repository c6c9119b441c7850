package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// A disk is needed while its snapshot is the top of an image (containers
// of the image start from it) or while a container or view uses it. A
// disk that is neither, such as a base image's once only an image built
// on it is left, is removed; its layers stay until containerd removes
// them, and the disk is built again if it is needed again.
//
// The sweep runs a little after snapshots are removed and containerd's
// garbage collection calls Cleanup, when told that images changed, and
// every sweepEvery. A disk is left alone for a grace period after it was
// built: a pull builds its top layer's disk before it records the image.
const (
	sweepEvery = 10 * time.Minute
	sweepDelay = time.Second
)

type sweeper struct {
	ms     *storage.MetaStore
	root   string
	images Images
	disks  *diskBuilder
	grace  time.Duration

	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

func startSweeper(s *Snapshotter, grace time.Duration) *sweeper {
	ctx, cancel := context.WithCancel(context.Background())
	w := &sweeper{
		ms: s.ms, root: s.root, images: s.images, disks: s.disks, grace: grace,
		kick: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{}),
	}
	go w.run(ctx)
	return w
}

// soon asks for a sweep shortly.
func (w *sweeper) soon() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *sweeper) stop() {
	w.cancel()
	<-w.done
}

func (w *sweeper) run(ctx context.Context) {
	defer close(w.done)
	tick := time.NewTicker(sweepEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-w.kick:
			select {
			case <-time.After(sweepDelay):
			case <-ctx.Done():
				return
			}
		}
		if n, err := w.sweep(ctx); err != nil {
			log.G(ctx).WithError(err).Debug("not sweeping disks")
		} else if n > 0 {
			log.G(ctx).WithField("disks", n).Info("removed disks no image needs")
		}
	}
}

// Sweep asks for a sweep of unneeded disks shortly (when kiln hears that
// images were removed).
func (s *Snapshotter) Sweep() {
	if s.sweeper != nil {
		s.sweeper.soon()
	}
}

// sweep removes the disks nothing needs and returns how many.
func (w *sweeper) sweep(ctx context.Context) (int, error) {
	tops, err := w.images.Tops(ctx)
	if err != nil {
		return 0, err
	}
	files, _ := filepath.Glob(filepath.Join(w.root, snapshotsDir, "*", diskFile))
	if len(files) == 0 {
		return 0, nil
	}
	gen := w.disks.generation()
	names, used, err := w.usage(ctx)
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, f := range files {
		id := filepath.Base(filepath.Dir(f))
		name, ok := names[id]
		if !ok || used[id] {
			continue // not a committed snapshot (yet), or in use
		}
		if d, err := digest.Parse(chainOf(name)); err == nil && tops[d] {
			continue
		}
		if fi, err := os.Stat(f); err != nil || time.Since(fi.ModTime()) < w.grace {
			continue
		}
		if w.disks.remove(ctx, id, gen) {
			log.G(ctx).WithFields(log.Fields{"snapshot": id, "name": name}).Debug("removed a disk no image needs")
			removed++
		}
	}
	return removed, nil
}

// usage returns the names of the committed snapshots by id, and which of
// them have a container or view on them.
func (w *sweeper) usage(ctx context.Context) (names map[string]string, used map[string]bool, err error) {
	names, used = map[string]string{}, map[string]bool{}
	err = w.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		for id, key := range ids {
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			if info.Kind == snapshots.KindCommitted {
				names[id] = key
				continue
			}
			if info.Parent == "" || dirKind(filepath.Join(w.root, snapshotsDir, id)) == kindLayer {
				continue
			}
			snap, err := storage.GetSnapshot(ctx, key)
			if err != nil {
				return err
			}
			used[snap.ParentIDs[0]] = true
		}
		return nil
	})
	return names, used, err
}
