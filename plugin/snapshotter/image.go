package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/dirtar"
	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/workdir"
)

// imageBuilder builds, once per committed snapshot, the ext4 holding the
// filesystem of its whole chain. Concurrent requests for one snapshot share
// one build; builds run one at a time.
type imageBuilder struct {
	s       *Snapshotter
	ctx     context.Context
	stop    context.CancelFunc
	slot    chan struct{}
	mu      sync.Mutex
	flights map[string]*flight
	wg      sync.WaitGroup

	emptyMu sync.Mutex
}

type flight struct {
	done    chan struct{}
	hurry   chan struct{} // closed when someone waits for an eager build
	hurried bool
	path    string
	err     error
	cancel  context.CancelFunc
	eager   bool // started by a commit, nobody waits for it yet
	waiters int
}

func newImageBuilder(s *Snapshotter) *imageBuilder {
	ctx, stop := context.WithCancel(context.Background())
	return &imageBuilder{s: s, ctx: ctx, stop: stop, slot: make(chan struct{}, 1), flights: map[string]*flight{}}
}

func (b *imageBuilder) close() {
	b.stop()
	b.wg.Wait()
}

// get returns the image of committed snapshot id, building it if needed.
func (b *imageBuilder) get(ctx context.Context, id string) (string, error) {
	for {
		dir := b.s.dir(id)
		if p := filepath.Join(dir, rootfsFile); exists(p) {
			// A committed container: make its journal clean, or views
			// (read-only) could not mount it.
			if dirty, err := ext4.NeedsRecovery(p); err != nil || !dirty {
				return p, err
			}
			return p, ext4.Recover(ctx, p)
		}
		if p := filepath.Join(dir, imageFile); exists(p) {
			return p, nil
		}
		f := b.join(id, false)
		select {
		case <-f.done:
		case <-ctx.Done():
			b.leave(f)
			return "", ctx.Err()
		}
		b.leave(f)
		if errors.Is(f.err, context.Canceled) && ctx.Err() == nil {
			continue // an eager build was called off; build for us
		}
		return f.path, f.err
	}
}

// join returns the flight building id, starting one if there is none.
func (b *imageBuilder) join(id string, eager bool) *flight {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.flights[id]
	if f == nil {
		ctx, cancel := context.WithCancel(b.ctx)
		f = &flight{done: make(chan struct{}), hurry: make(chan struct{}), cancel: cancel, eager: eager}
		b.flights[id] = f
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			if eager && b.s.injects() {
				// A build with injection takes the layer's staged tree:
				// give the unpacker a moment to prepare a child layer,
				// which calls this off and continues the tree instead.
				select {
				case <-time.After(eagerGrace):
				case <-f.hurry:
				case <-ctx.Done():
				}
			}
			start := time.Now()
			f.path, f.err = b.build(ctx, id)
			if obs := b.s.cfg.ObserveBuild; obs != nil {
				obs(time.Since(start), f.err)
			}
			cancel()
			b.mu.Lock()
			if b.flights[id] == f {
				delete(b.flights, id)
			}
			b.mu.Unlock()
			close(f.done)
		}()
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

// injects says whether builds add files to the image (and so consume the
// staged tree they build from).
func (s *Snapshotter) injects() bool {
	return len(s.cfg.Inject.Pieces) > 0 || s.cfg.Inject.Dir != ""
}

// eagerGrace is how long an eager build waits for a child layer.
const eagerGrace = 200 * time.Millisecond

func (b *imageBuilder) leave(f *flight) {
	b.mu.Lock()
	f.waiters--
	b.mu.Unlock()
}

// startEager builds the image of a just committed layer in the
// background: it is likely an image's top layer, needed soon.
func (b *imageBuilder) startEager(id string) { b.join(id, true) }

// cancelEager calls off the eager build of a committed snapshot that just
// got a child layer: it was not the top of an image.
func (b *imageBuilder) cancelEager(ctx context.Context, parent string) {
	var id string
	err := b.s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, parent)
		return err
	})
	if err != nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if f := b.flights[id]; f != nil && f.eager && f.waiters == 0 {
		f.cancel()
	}
}

// forget calls off any build for a removed snapshot.
func (b *imageBuilder) forget(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f := b.flights[id]; f != nil && f.waiters == 0 {
		f.cancel()
	}
}

// build makes dir/image.ext4 from the snapshot's chain.
func (b *imageBuilder) build(ctx context.Context, id string) (string, error) {
	select {
	case b.slot <- struct{}{}:
		defer func() { <-b.slot }()
	case <-ctx.Done():
		return "", ctx.Err()
	}
	dst := filepath.Join(b.s.dir(id), imageFile)
	if exists(dst) {
		return dst, nil // a build that just finished
	}
	chain, err := b.chain(ctx, id)
	if err != nil {
		return "", err
	}
	layers, chainID, byID, err := b.layers(chain)
	if err != nil {
		return "", err
	}
	opts := b.s.cfg.Build
	opts.NoSync = true // see durable.go
	if opts.Inject, err = b.injection(ctx, chain[0], chainID, byID); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", id, err)
	}
	key := build.Key(chainID, opts)
	wd, err := workdir.New(filepath.Join(b.s.root, "tmp"))
	if err != nil {
		return "", err
	}
	defer wd.Release()
	out := filepath.Join(wd.Path, imageFile)
	res, staged, err := b.buildStaged(ctx, id, out, key, opts)
	if !staged {
		log.G(ctx).WithFields(log.Fields{"snapshot": id, "layers": len(layers)}).Debug("building image")
		res, err = build.Rootfs(ctx, layers, out, wd.Path, key, opts, nil)
	}
	if err != nil {
		return "", fmt.Errorf("building the rootfs of snapshot %s: %w", id, err)
	}
	if err := os.Chmod(out, 0o444); err != nil {
		return "", err
	}
	unsynced := filepath.Join(b.s.dir(id), unsyncedFile)
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
	log.G(ctx).WithFields(log.Fields{
		"snapshot": id, "unpack": res.Unpack, "build": res.Build, "size": res.Size,
	}).Info("built image rootfs")
	return dst, nil
}

// chain returns the ids of a committed snapshot and its ancestors, the
// snapshot first.
func (b *imageBuilder) chain(ctx context.Context, id string) ([]string, error) {
	var chain []string
	err := b.s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		key, ok := ids[id]
		if !ok {
			return fmt.Errorf("snapshot %s: %w", id, errdefs.ErrNotFound)
		}
		// Committed snapshots are found by name; each names its parent.
		for key != "" {
			sid, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			chain = append(chain, sid)
			key = info.Parent
		}
		return nil
	})
	return chain, err
}

// layers turns a chain (top first) into the layers to replay, bottom
// first, and the chain ID to build them under: the image's, like `kiln
// convert`, when every layer's diffID is known (byID), so both give the
// same bytes; one made from the snapshot IDs otherwise.
func (b *imageBuilder) layers(chain []string) (_ []build.Layer, _ digest.Digest, byID bool, _ error) {
	var (
		layers  []build.Layer
		diffIDs []digest.Digest
		ids     []string
	)
	byID = true
	for i := len(chain) - 1; i >= 0; i-- {
		dir := b.s.dir(chain[i])
		ids = append(ids, chain[i])
		tarPath, diffIDPath := LayerFiles(dir)
		switch {
		case exists(filepath.Join(dir, rootfsFile)):
			// A committed container: its filesystem is the base.
			layers, diffIDs, byID = []build.Layer{b.ext4Layer(filepath.Join(dir, rootfsFile))}, nil, false
		case exists(tarPath):
			raw, err := os.ReadFile(diffIDPath)
			if err != nil {
				return nil, "", false, err
			}
			d, err := digest.Parse(strings.TrimSpace(string(raw)))
			if err != nil {
				return nil, "", false, fmt.Errorf("snapshot %s: %w", chain[i], err)
			}
			diffIDs = append(diffIDs, d)
			layers = append(layers, build.Layer{
				Descriptor: descriptor(d),
				Size:       fileSize(tarPath),
				Open:       func() (io.ReadCloser, error) { return os.Open(tarPath) },
				Stored:     tarPath,
			})
		case exists(filepath.Join(dir, layerMarker)):
			// Filled by containerd's walking differ.
			upper := filepath.Join(dir, upperDir)
			layers = append(layers, build.Layer{
				Descriptor: descriptor(""),
				Size:       -1,
				Open:       func() (io.ReadCloser, error) { return dirReader(upper, dirtar.Options{Overlay: true}), nil },
			})
			byID = false
		default:
			return nil, "", false, fmt.Errorf("snapshot %s has no filesystem", chain[i])
		}
	}
	if byID {
		return layers, identity.ChainID(diffIDs), true, nil
	}
	return layers, digest.FromString("kiln-snapshots:" + strings.Join(ids, ",")), false, nil
}

// injection prepares what the configuration injects into an image. The
// init piece needs the image's config, found in containerd's image store
// by chain ID; right after a pull the image may not be recorded yet, so
// it is looked for a little while.
func (b *imageBuilder) injection(ctx context.Context, top string, chainID digest.Digest, byID bool) (*inject.Set, error) {
	opts := b.s.cfg.Inject
	needConfig := false
	for _, p := range opts.Pieces {
		needConfig = needConfig || p == guest.PieceInit
	}
	var config []byte
	if needConfig {
		if !byID || b.s.cfg.ImageConfig == nil {
			return nil, errors.New("injecting init needs the image config, which is unknown for this chain")
		}
		ns, err := os.ReadFile(filepath.Join(b.s.dir(top), namespaceFile))
		if err != nil {
			return nil, fmt.Errorf("injecting init: %w", err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			config, err = b.s.cfg.ImageConfig(ctx, string(ns), chainID)
			if err == nil || !errdefs.IsNotFound(err) || time.Now().After(deadline) {
				break
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(250 * time.Millisecond):
			}
		}
		if err != nil {
			return nil, fmt.Errorf("injecting init: no image in namespace %q has chain %s: %w", ns, chainID, err)
		}
	}
	return inject.New(opts, config)
}

func descriptor(diffID digest.Digest) layer.Descriptor {
	return layer.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: diffID, DiffID: diffID}
}

// dirReader streams a directory tree as a tar.
func dirReader(dir string, opts dirtar.Options) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(dirtar.Write(pw, dir, opts)) }()
	return pr
}

// ext4Layer streams the content of an ext4 file as a tar, read through a
// read-only loop mount (kiln serve runs as root).
func (b *imageBuilder) ext4Layer(file string) build.Layer {
	return build.Layer{
		Descriptor: descriptor(""),
		Size:       -1,
		Open: func() (io.ReadCloser, error) {
			mnt, err := os.MkdirTemp(filepath.Join(b.s.root, "tmp"), "mnt-")
			if err != nil {
				return nil, err
			}
			m := []mount.Mount{{Type: "ext4", Source: file, Options: []string{"ro", "loop", "noload"}}}
			if err := mount.All(m, mnt); err != nil {
				os.Remove(mnt)
				return nil, fmt.Errorf("mounting %s: %w", file, err)
			}
			return &unmountingReader{ReadCloser: dirReader(mnt, dirtar.Options{}), dir: mnt}, nil
		},
	}
}

type unmountingReader struct {
	io.ReadCloser
	dir string
}

func (u *unmountingReader) Close() error {
	u.ReadCloser.Close()
	err := mount.UnmountAll(u.dir, 0)
	os.Remove(u.dir)
	return err
}

// empty returns a small empty read-only image for views without a parent.
func (b *imageBuilder) empty(ctx context.Context) (string, error) {
	b.emptyMu.Lock()
	defer b.emptyMu.Unlock()
	p := filepath.Join(b.s.root, "empty.ext4")
	if exists(p) {
		return p, nil
	}
	if err := b.s.emptyExt4(ctx, p+".tmp", 16<<20); err != nil {
		return "", err
	}
	return p, os.Rename(p+".tmp", p)
}

// emptyExt4 builds an empty filesystem of size bytes at path.
func (s *Snapshotter) emptyExt4(ctx context.Context, path string, size int64) error {
	wd, err := workdir.New(filepath.Join(s.root, "tmp"))
	if err != nil {
		return err
	}
	defer wd.Release()
	os.Remove(path)
	_, err = build.Rootfs(ctx, nil, path, wd.Path, build.Key(digest.FromString("kiln-empty"), build.Options{Size: size}), build.Options{Size: size}, nil)
	return err
}

// prepareContainer makes a container's writable filesystem: a copy of the
// parent's image (a reflink where the filesystem can share blocks), or an
// empty one, sized as asked.
func (s *Snapshotter) prepareContainer(ctx context.Context, dir, base string, size int64) error {
	file := filepath.Join(dir, rootfsFile)
	if base == "" {
		return s.emptyExt4(ctx, file, size)
	}
	if err := clone.File(base, file, 0o600); err != nil {
		return fmt.Errorf("copying the image: %w", err)
	}
	if size > 0 {
		if err := ext4.Resize(ctx, file, size); err != nil {
			return fmt.Errorf("%s: %w", snapshots.LabelSnapshotMaxSize, err)
		}
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return -1
	}
	return fi.Size()
}
