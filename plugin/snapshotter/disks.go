package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/workdir"
)

// chainSource says what a committed snapshot's filesystem is made of.
type chainSource interface {
	chainLayers(ctx context.Context, id string) (chainLayers, error)
}

// diskBuilder builds, once per committed snapshot, the disk holding the
// filesystem of its whole chain. Concurrent requests for one snapshot
// share one build (a flight); builds run through a buildQueue. A disk a
// container or view is being made on is pinned: the sweep (see sweep.go)
// leaves it alone until the new snapshot is recorded.
type diskBuilder struct {
	root   string // kiln's root: snapshot directories and tmp
	chains chainSource
	staged *stagedTrees
	opts   build.Options
	inject *inject.Set // the guest pieces, without any image's config
	queue  *buildQueue
	// observe, if set, is told how each build went.
	observe func(d time.Duration, err error)
	// share says whether disks are fetched from and published to
	// registries; onShare, if set, is told what happened (ShareResults).
	share      Share
	onShare    func(result string)
	lazy       *lazyImages   // nil unless share.Lazy
	publishing chan struct{} // one publish at a time
	queued     int           // publishes started or waiting (mu)

	ctx  context.Context // ends with close
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu      sync.Mutex
	flights map[string]*flight
	pins    map[string]int
	// made counts the snapshots made on a pinned disk: the sweep removes
	// a disk only if none was made since it looked.
	made uint64
}

type flight struct {
	done    chan struct{}
	hurry   chan struct{} // closed when somebody waits for an eager build
	hurried bool
	path    string
	err     error
	cancel  context.CancelFunc
	eager   bool // started by a commit, nobody waits for it yet
	waiters int
}

func newDiskBuilder(root string, chains chainSource, staged *stagedTrees, opts build.Options, set *inject.Set,
	queue *buildQueue, observe func(time.Duration, error)) *diskBuilder {
	ctx, stop := context.WithCancel(context.Background())
	return &diskBuilder{
		root: root, chains: chains, staged: staged, opts: opts, inject: set, queue: queue, observe: observe,
		publishing: make(chan struct{}, 1),
		ctx:        ctx, stop: stop, flights: map[string]*flight{}, pins: map[string]int{},
	}
}

func (b *diskBuilder) close() {
	b.stop()
	b.wg.Wait()
}

func (b *diskBuilder) dir(id string) string { return filepath.Join(b.root, snapshotsDir, id) }

// get returns the disk of committed snapshot id, building it if needed.
func (b *diskBuilder) get(ctx context.Context, id string) (string, error) {
	for {
		if p := filepath.Join(b.dir(id), diskFile); exists(p) {
			return p, nil
		}
		if b.lazy != nil {
			if p, ok, err := b.lazy.disk(ctx, b.dir(id), id, true); ok || err != nil {
				return p, err
			}
		}
		f := b.join(id, false)
		select {
		case <-f.done:
		case <-ctx.Done():
			b.leave(f)
			return "", ctx.Err()
		}
		b.leave(f)
		if errors.Is(f.err, context.Canceled) && ctx.Err() == nil && b.ctx.Err() == nil {
			continue // an eager build was called off; build for us
		}
		return f.path, f.err
	}
}

// acquire is get for a disk a new snapshot will use: the disk stays
// pinned until release, which the caller calls once the snapshot is
// recorded.
func (b *diskBuilder) acquire(ctx context.Context, id string) (path string, release func(), err error) {
	b.mu.Lock()
	b.pins[id]++
	b.mu.Unlock()
	release = func() {
		b.mu.Lock()
		if b.pins[id]--; b.pins[id] <= 0 {
			delete(b.pins, id)
		}
		b.made++
		b.mu.Unlock()
	}
	path, err = b.get(ctx, id)
	if err != nil {
		release()
		return "", nil, err
	}
	return path, release, nil
}

// join returns the flight building id, starting one if there is none.
func (b *diskBuilder) join(id string, eager bool) *flight {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.flights[id]
	if f == nil {
		ctx, cancel := context.WithCancel(b.ctx)
		f = &flight{done: make(chan struct{}), hurry: make(chan struct{}), cancel: cancel, eager: eager}
		b.flights[id] = f
		b.wg.Add(1)
		go b.fly(ctx, id, f, eager)
	}
	if !eager {
		f.waiters++
		f.eager = false
		if !f.hurried {
			f.hurried = true
			close(f.hurry)
		}
	}
	return f
}

// fly builds the disk of id for flight f; eager says whether it started
// ahead of need (somebody waiting makes it urgent through f.hurry).
func (b *diskBuilder) fly(ctx context.Context, id string, f *flight, eager bool) {
	defer b.wg.Done()
	if eager {
		// Give the unpacker a moment to prepare a child layer, which
		// calls this off: only an image's top layer needs a disk, and a
		// build of every layer of a many-layer image would cost layers
		// times its size. (A build with injection would also take the
		// layer's staged tree, which the child continues.)
		select {
		case <-time.After(eagerGrace):
		case <-f.hurry:
		case <-ctx.Done():
		}
	}
	start := time.Now()
	release, err := b.queue.acquire(ctx, !eager, f.hurry)
	if err == nil {
		f.path, f.err = b.build(ctx, id)
		release()
	} else {
		f.err = err
	}
	if f.err != nil && !errors.Is(f.err, context.Canceled) && !errdefs.IsNotFound(f.err) {
		// An eager build's error reaches nobody else. (A build called
		// off or of a snapshot removed meanwhile is no failure.)
		log.G(ctx).WithError(f.err).WithField("snapshot", id).Error("building disk failed")
	}
	if b.observe != nil {
		b.observe(time.Since(start), f.err)
	}
	f.cancel()
	b.mu.Lock()
	if b.flights[id] == f {
		delete(b.flights, id)
	}
	b.mu.Unlock()
	close(f.done)
}

// eagerGrace is how long an eager build waits for a child layer.
const eagerGrace = 200 * time.Millisecond

func (b *diskBuilder) leave(f *flight) {
	b.mu.Lock()
	f.waiters--
	b.mu.Unlock()
}

// startEager builds the disk of a just committed layer in the background:
// it is likely an image's top layer, needed soon.
func (b *diskBuilder) startEager(id string) { b.join(id, true) }

// cancelEager calls off the eager build of a committed snapshot that just
// got a child layer: it was not the top of an image.
func (b *diskBuilder) cancelEager(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f := b.flights[id]; f != nil && f.eager && f.waiters == 0 {
		f.cancel()
	}
}

// forget calls off any build for a removed snapshot.
func (b *diskBuilder) forget(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f := b.flights[id]; f != nil && f.waiters == 0 {
		f.cancel()
	}
}

// build makes the disk file of snapshot id from its chain.
func (b *diskBuilder) build(ctx context.Context, id string) (string, error) {
	dst := filepath.Join(b.dir(id), diskFile)
	if exists(dst) {
		return dst, nil // a build that just finished
	}
	chain, err := b.chains.chainLayers(ctx, id)
	if err != nil {
		return "", err
	}
	opts := b.opts
	opts.NoSync = true // see durable.go
	opts.Inject = b.inject
	wd, err := workdir.New(filepath.Join(b.root, tmpDir))
	if err != nil {
		return "", err
	}
	defer wd.Release()
	req := build.Request{ChainID: chain.chainID, Layers: chain.layers, Out: filepath.Join(wd.Path, diskFile), WorkDir: wd.Path, Options: opts}
	out := req.Out
	shared := chain.image.known() && (b.share.Pull || b.share.Push)
	fetched := shared && b.share.Pull && b.fetchPublished(ctx, chain, opts, out)
	var res build.Result
	if !fetched {
		if n := len(chain.layers); n > 0 && chain.layers[n-1].Record != "" {
			// Built in the top layer's data file (see store.go), which
			// gets a name of its own in the snapshot directory first.
			if err := settleBuilding(b.dir(id)); err != nil {
				return "", fmt.Errorf("snapshot %s: its layer's data file: %w", id, err)
			}
			req.TakeTop, req.Out = true, filepath.Join(b.dir(id), diskBuilding)
			out = req.Out
			defer settleBuilding(b.dir(id)) //nolint:errcheck // the next build settles it again
		}
		var staged bool
		res, staged, err = b.staged.build(ctx, id, req)
		if !staged {
			log.G(ctx).WithFields(log.Fields{"snapshot": id, "layers": len(chain.layers)}).Debug("building disk")
			res, err = build.Rootfs(ctx, req, nil)
		}
		if err != nil {
			return "", fmt.Errorf("building the disk of snapshot %s (chain %s) in %s: %w", id, chain.chainID, wd.Path, err)
		}
	}
	if err := os.Chmod(out, 0o444); err != nil {
		return "", err
	}
	unsynced := filepath.Join(b.dir(id), unsyncedFile)
	if err := markUnsynced(unsynced); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("snapshot %s was removed: %w", id, errdefs.ErrNotFound)
		}
		return "", err
	}
	if err := os.Rename(out, dst); err != nil {
		os.Remove(unsynced)
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("snapshot %s was removed: %w", id, errdefs.ErrNotFound)
		}
		return "", err
	}
	b.syncLater(dst, unsynced)
	if fetched {
		log.G(ctx).WithFields(log.Fields{"snapshot": id, "image": chain.image.ref}).Info("fetched disk")
		return dst, nil
	}
	log.G(ctx).WithFields(log.Fields{
		"snapshot": id, "unpack": res.Unpack, "build": res.Build, "size": res.Size,
	}).Info("built disk")
	if shared && b.share.Push {
		b.publishLater(ctx, dst, chain, opts)
	}
	return dst, nil
}

// settleBuilding brings the layer's data file of snapshot directory dir
// back to its layer's contents alone, as a build in it needs it and as a
// failed one leaves it: a disk.building that a build did not name
// disk.ext4 (it failed, or kiln stopped) is the data file again if it
// was made in it, or is removed; what a build added to the data file
// goes.
func settleBuilding(dir string) error {
	building, data := filepath.Join(dir, diskBuilding), filepath.Join(dir, layerData)
	if exists(building) {
		if exists(data) {
			os.Remove(building)
		} else if err := os.Rename(building, data); err != nil {
			return err
		}
	}
	if !exists(data) {
		return nil // the disk holds it
	}
	st, err := fstree.ReadStored(filepath.Join(dir, layerRecord))
	if err != nil {
		return err
	}
	return keepOwn(data, st)
}

// generation returns the count of snapshots made on pinned disks so far.
func (b *diskBuilder) generation() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.made
}

// remove deletes the disk of snapshot id unless a build, a waiter or a
// pin needs it, or a snapshot was made on a disk since generation gen
// (when the caller found the disk unneeded).
func (b *diskBuilder) remove(ctx context.Context, id string, gen uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.flights[id] != nil || b.pins[id] > 0 || b.made != gen {
		return false
	}
	if holdsData(b.dir(id)) {
		// Nothing uses it: it becomes its layer's data file again.
		if err := dropDisk(b.dir(id), false); err != nil {
			log.G(ctx).WithError(err).WithField("snapshot", id).Warn("removing an unneeded disk")
			return false
		}
		return true
	}
	disk := filepath.Join(b.dir(id), diskFile)
	tmp := filepath.Join(b.root, tmpDir, "rm-disk-"+id)
	if err := os.Rename(disk, tmp); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("snapshot", id).Warn("removing an unneeded disk")
		}
		return false
	}
	os.Remove(filepath.Join(b.dir(id), unsyncedFile))
	go os.Remove(tmp)
	return true
}
