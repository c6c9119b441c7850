package snapshotter

// Lazily loaded images (Share.Lazy).
//
// When containerd unpacks an image that has a chunked rootfs of kiln's
// build published beside it (kiln push --chunked), kiln answers the
// Prepare of each layer's extraction snapshot as containerd's remote
// snapshotters do: it commits a snapshot of its own under the layer's
// chain and returns errdefs.ErrAlreadyExists, and containerd downloads
// and applies none of the layers. Such a snapshot holds no data, only
// lazyFile, which says where its layer is. The disk of the image's top
// layer is the published rootfs, served as a file through FUSE: a read
// fetches the chunks it touches, checks them and keeps them in the chunk
// cache, shared by every image. Any other chain through these layers
// (an image sharing the base but published without one) is built as
// usual, its lazily loaded layers read from the registry.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	snpkg "github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/chunked"
	"github.com/kilnfs/kiln/internal/convert"
	"github.com/kilnfs/kiln/internal/fusedisk"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/share"
	"github.com/kilnfs/kiln/internal/workdir"
)

const (
	// lazyFile, in a snapshot directory, marks a lazily loaded layer.
	lazyFile = "lazy.json"
	// lazyDir, under the root, holds one mount directory per lazily
	// loaded disk, named by its snapshot's id.
	lazyDir = "lazy"
	// chunksDir, under the root, is the chunk cache.
	chunksDir = "chunks"
	// lookupTTL is how long what a registry said about an image is
	// trusted: a pull prepares all of its layers within it.
	lookupTTL = time.Minute
	// lookupTimeout bounds what asking the registry about an image may
	// take.
	lookupTimeout = 30 * time.Second
	// prefetchWorkers are the fetches at a time of a background prefetch.
	prefetchWorkers = 4
)

// lazyLayer is what lazyFile says: the layer, the image it was pulled
// for, where its blob is, and the image whose top it is, if any.
type lazyLayer struct {
	Ref       string        `json:"ref"`
	Manifest  digest.Digest `json:"manifest"`
	Index     int           `json:"index"`
	Layers    int           `json:"layers"`
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	DiffID    digest.Digest `json:"diffID"`
	// Chain is the chain ID of the layers up to this one.
	Chain digest.Digest `json:"chain"`
	Top   *lazyTop      `json:"top,omitempty"`
}

// lazyTop is an image, published chunked, whose top a snapshot is: its
// disk is that image's published rootfs.
type lazyTop struct {
	Ref      string        `json:"ref"`
	Manifest digest.Digest `json:"manifest"`
}

// readLazy reads the lazyFile of snapshot directory dir; ok is false
// when there is none.
func readLazy(dir string) (l lazyLayer, ok bool, err error) {
	raw, err := os.ReadFile(filepath.Join(dir, lazyFile))
	if errors.Is(err, os.ErrNotExist) {
		return l, false, nil
	}
	if err == nil {
		err = json.Unmarshal(raw, &l)
	}
	if err != nil {
		return l, false, fmt.Errorf("%s: %w", filepath.Join(dir, lazyFile), err)
	}
	return l, true, nil
}

// lazyImages finds published chunked rootfs and serves them.
type lazyImages struct {
	root    string
	share   Share
	opts    build.Options // as disks are built
	onShare func(result string)
	images  Images // nil: images whose layers came in for another are built

	storeMu  sync.Mutex
	store    atomic.Pointer[chunked.Store] // opened in the background at start
	recordMu sync.Mutex                    // markTop's rewrites

	mu       sync.Mutex
	lookups  map[digest.Digest]*lookup
	noTop    map[string]time.Time     // snapshots found to be no lazily loaded image's top, by namespace/id
	searches map[string]chan struct{} // topOf's searches under way
	mounts   map[string]*lazyMount
	closed   bool
	wg       sync.WaitGroup
	// leaving are the mounts being unmounted, fetched what the readers
	// of those unmounted fetched.
	leaving map[*lazyMount]bool
	fetched int64
}

// lookup is what the registry said about an image.
type lookup struct {
	done     chan struct{}
	at       time.Time
	img      *image.Image
	chainIDs []digest.Digest
	chunked  *share.Chunked // nil: none of this build
	key      string
}

// lazyMount is a lazily loaded disk, mounted or being mounted.
type lazyMount struct {
	done  chan struct{}
	path  string
	err   error
	disk  *fusedisk.Disk
	lazy  *convert.Lazy
	stop  context.CancelFunc // ends the prefetch
	ended chan struct{}      // closed when the prefetch has ended
	// used is closed when a container or view first asks for the disk,
	// at usedAt: its boot's reads are the next LazyBootWindow's.
	useOnce sync.Once
	used    chan struct{}
	usedAt  time.Time
}

func (m *lazyMount) use() {
	m.useOnce.Do(func() {
		m.usedAt = time.Now()
		close(m.used)
	})
}

func newLazyImages(root string, sh Share, opts build.Options, images Images, onShare func(string)) *lazyImages {
	l := &lazyImages{root: root, share: sh, opts: opts, images: images, onShare: onShare,
		lookups: map[digest.Digest]*lookup{}, noTop: map[string]time.Time{}, searches: map[string]chan struct{}{}, mounts: map[string]*lazyMount{}, leaving: map[*lazyMount]bool{}}
	l.settle()
	l.background(func() {
		if _, err := l.chunkStore(); err != nil {
			log.L.WithError(err).Warn("opening the chunk cache")
		}
	})
	return l
}

// settle clears the mounts a previous run left: their server is gone.
func (l *lazyImages) settle() {
	dirs, _ := filepath.Glob(filepath.Join(l.root, lazyDir, "*"))
	for _, d := range dirs {
		if err := fusedisk.ClearDead(d); err != nil {
			log.L.WithError(err).WithField("dir", d).Warn("clearing a lazily loaded disk's mount")
			continue
		}
		os.Remove(d)
	}
}

func (l *lazyImages) chunkStore() (*chunked.Store, error) {
	l.storeMu.Lock()
	defer l.storeMu.Unlock()
	if st := l.store.Load(); st != nil {
		return st, nil
	}
	st, err := chunked.OpenStore(filepath.Join(l.root, chunksDir), l.share.LazyCacheMaxSize)
	if err != nil {
		return nil, err
	}
	l.store.Store(st)
	return st, nil
}

// find returns what the registry of ref says about the image whose
// manifest digest is manifest: its layers and any chunked rootfs of
// kiln's build. A registry that cannot be asked counts as one without.
func (l *lazyImages) find(ctx context.Context, ref string, manifest digest.Digest) *lookup {
	l.mu.Lock()
	lk := l.lookups[manifest]
	if lk != nil {
		select {
		case <-lk.done:
			if time.Since(lk.at) > lookupTTL {
				lk = nil
			}
		default:
		}
	}
	if lk == nil {
		// Asked apart from the request, which may give up, and within
		// lookupTimeout: a pull waits for the answer, and other pulls
		// of the image share it.
		for m, old := range l.lookups {
			select {
			case <-old.done:
				if time.Since(old.at) > lookupTTL {
					delete(l.lookups, m)
				}
			default:
			}
		}
		lk = &lookup{done: make(chan struct{})}
		l.lookups[manifest] = lk
		l.mu.Unlock()
		go func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lookupTimeout)
			defer cancel()
			l.resolve(rctx, lk, ref, manifest)
			lk.at = time.Now()
			close(lk.done)
		}()
	} else {
		l.mu.Unlock()
	}
	select {
	case <-lk.done:
		return lk
	case <-ctx.Done():
		return &lookup{}
	}
}

func (l *lazyImages) resolve(ctx context.Context, lk *lookup, ref string, manifest digest.Digest) {
	lg := log.G(ctx).WithFields(log.Fields{"image": ref, "manifest": manifest.String()})
	r, err := name.ParseReference(ref)
	if err != nil {
		lg.WithError(err).Warn("not loading the image lazily")
		return
	}
	img, err := image.Resolve(ctx, r.Context().Digest(manifest.String()).String(), l.share.Image)
	if err != nil {
		lg.WithError(err).Warn("not loading the image lazily")
		return
	}
	if img.Digest != manifest {
		lg.Warnf("not loading the image lazily: the registry resolves it to %s", img.Digest)
		return
	}
	t, err := image.Server(ctx, ref, l.share.Image)
	if err != nil {
		lg.WithError(err).Warn("not loading the image lazily")
		return
	}
	id := build.IdentityOf(img.ChainID(), l.opts)
	maxSize := int64(1 << 62)
	if l.opts.Size > 0 {
		maxSize = share.MaxImageSize(l.opts, l.root)
	}
	c, err := share.FindChunked(ctx, t, manifest, id, maxSize)
	if err != nil {
		if errors.Is(err, share.ErrNotPublished) {
			lg.WithError(err).Debug("no chunked rootfs to load lazily")
		} else {
			lg.WithError(err).Warn("not loading the image lazily")
		}
		return
	}
	lk.chainIDs = identity.ChainIDs(slices.Clone(img.Config.RootFS.DiffIDs))
	lk.img, lk.chunked, lk.key = img, c, id.Key
}

// prepareLazy answers the Prepare of an extraction snapshot whose layer can
// be loaded lazily: it records the layer as a committed snapshot and
// returns an error wrapping errdefs.ErrAlreadyExists; handled is false
// when the layer is to be pulled as usual.
func (s *Snapshotter) prepareLazy(ctx context.Context, key, parent string, info snapshots.Info, opts []snapshots.Opt) (handled bool, err error) {
	lbl := info.Labels
	ref, target, layerDigest := lbl[snpkg.TargetRefLabel], lbl[snapshots.LabelSnapshotRef], lbl[snpkg.TargetLayerDigestLabel]
	manifest, err := digest.Parse(lbl[snpkg.TargetManifestDigestLabel])
	if ref == "" || target == "" || layerDigest == "" || err != nil {
		return false, nil
	}
	lk := s.lazy.find(ctx, ref, manifest)
	if lk.chunked == nil {
		return false, nil
	}
	i := -1
	for j, ly := range lk.img.Layers {
		if ly.Digest.String() == layerDigest && lk.chainIDs[j].String() == target {
			i = j
			break
		}
	}
	if i < 0 {
		return false, nil
	}
	if i == 0 && parent != "" || i > 0 && chainOf(parent) != lk.chainIDs[i-1].String() {
		return false, nil // not on the chain of the image's layers below
	}
	ly := lk.img.Layers[i]
	rec := lazyLayer{Ref: ref, Manifest: manifest, Index: i, Layers: len(lk.img.Layers),
		Digest: ly.Digest, MediaType: ly.MediaType, Size: ly.Size, DiffID: lk.img.Config.RootFS.DiffIDs[i], Chain: lk.chainIDs[i]}
	if i == len(lk.img.Layers)-1 {
		rec.Top = &lazyTop{Ref: ref, Manifest: manifest}
	}
	raw, err := json.Marshal(rec)
	if err != nil {
		return true, err
	}
	stage, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), "new-")
	if err != nil {
		return true, err
	}
	defer os.RemoveAll(stage)
	if err := s.prepareLayer(ctx, stage); err != nil {
		return true, err
	}
	if err := writeSynced(stage, lazyFile, raw); err != nil {
		return true, err
	}
	// A name of its own: containerd finds the snapshot by its labels and
	// parent.
	var nonce [8]byte
	rand.Read(nonce[:]) //nolint:errcheck // never fails
	committed := "lazy-" + hex.EncodeToString(nonce[:]) + "/" + target
	var id, placed string
	var pulled bool
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// Pulled already (in another namespace): containerd finds that
		// snapshot as it would find a new one, by its labels and parent.
		if id, err = committedLayer(ctx, target, parent); err != nil || id != "" {
			pulled = id != ""
			return err
		}
		snap, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, opts...)
		if err != nil {
			return err
		}
		if _, err := storage.CommitActive(ctx, key, committed, snapshots.Usage{}, opts...); err != nil {
			return err
		}
		id = snap.ID
		placed, err = s.place(snap.ID, stage)
		return err
	})
	if err != nil {
		if placed != "" {
			os.RemoveAll(placed) // the snapshot was not recorded
		}
		return true, fmt.Errorf("recording layer %s of image %s, loaded lazily: %w", ly.Digest, ref, err)
	}
	lg := log.G(ctx).WithFields(log.Fields{"image": ref, "layer": ly.Digest.String(), "snapshot": id})
	if pulled {
		// Pulled as a layer below another image's top, it may now be
		// this image's top as well.
		if rec.Top != nil {
			if _, _, err := s.lazy.markTop(s.dir(id), *rec.Top); err != nil {
				return true, fmt.Errorf("layer %s of image %s: %w", ly.Digest, ref, err)
			}
			s.lazy.mountSoon(lg, s.dir(id), id)
		}
		return true, fmt.Errorf("layer %s of image %s: %w", ly.Digest, ref, errdefs.ErrAlreadyExists)
	}
	lg.Debug("layer loaded lazily: containerd skips it")
	if rec.Top != nil {
		lg.Info("the image is loaded lazily")
		s.lazy.observe(shareLazy)
		s.lazy.mountSoon(lg, s.dir(id), id)
	}
	return true, fmt.Errorf("layer %s of image %s is loaded lazily: %w", ly.Digest, ref, errdefs.ErrAlreadyExists)
}

// mountSoon mounts the disk of the top of a lazily loaded image in the
// background, so that the boot profile's chunks are on their way before
// a container asks.
func (l *lazyImages) mountSoon(lg *log.Entry, dir, id string) {
	l.background(func() {
		l.disk(log.WithLogger(context.Background(), lg), dir, id, false) //nolint:errcheck // logged; a container's request tries again
	})
}

// markTop records that the lazily loaded layer in snapshot directory dir
// is the top of image top, unless it is known as the top of one already,
// and returns the top recorded (nil if the snapshot is not lazily loaded
// or gone) and whether it wrote it.
func (l *lazyImages) markTop(dir string, top lazyTop) (*lazyTop, bool, error) {
	l.recordMu.Lock()
	defer l.recordMu.Unlock()
	rec, ok, err := readLazy(dir)
	if err != nil || !ok || rec.Top != nil {
		return rec.Top, false, err
	}
	rec.Top = &top
	raw, err := json.Marshal(rec)
	if err != nil {
		return nil, false, err
	}
	if err := writeSynced(dir, lazyFile, raw); err != nil {
		return nil, false, err
	}
	return &top, true, nil
}

// background runs fn in a goroutine that close waits for, unless
// closed.
func (l *lazyImages) background(fn func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		fn()
	}()
}

// writeSynced writes (or replaces) a file in dir, through a temporary
// name, and makes it and its name durable: a layer directory without its
// lazyFile would pass for an empty layer.
func writeSynced(dir, name string, data []byte) error {
	tmp := filepath.Join(dir, name+".new")
	os.Remove(tmp) // what a crash left
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// committedLayer returns the id of a committed snapshot of the layer
// chain target on parent, "" if there is none; ctx holds a transaction.
func committedLayer(ctx context.Context, target, parent string) (string, error) {
	name := ""
	filter := fmt.Sprintf("labels.%q==%s,parent==%q", snapshots.LabelSnapshotRef, target, parent)
	err := storage.WalkInfo(ctx, func(_ context.Context, i snapshots.Info) error {
		if name == "" && i.Kind == snapshots.KindCommitted && i.Labels[snapshots.LabelSnapshotRef] == target && i.Parent == parent {
			name = i.Name
		}
		return nil
	}, filter)
	if errdefs.IsNotFound(err) || err == nil && name == "" {
		return "", nil // none, or no snapshot at all yet
	}
	if err != nil {
		return "", err
	}
	id, _, _, err := storage.GetInfo(ctx, name)
	return id, err
}

func (l *lazyImages) observe(result string) {
	if l.onShare != nil {
		l.onShare(result)
	}
}

// disk returns the lazily loaded disk of the committed snapshot id in
// dir, mounting it if needed; use says a container or view asks for it.
// ok is false when the snapshot is not the top of a lazily loaded image,
// or its disk cannot be served (it is then built from its layers, read
// from the registry); err is set when the caller gave up waiting, or
// kiln is stopping.
func (l *lazyImages) disk(ctx context.Context, dir, id string, use bool) (path string, ok bool, err error) {
	rec, isLazy, err := readLazy(dir)
	if err != nil {
		log.G(ctx).WithError(err).Warn("reading a lazily loaded layer's record")
		return "", false, nil
	}
	if isLazy && rec.Top == nil && use {
		rec.Top = l.topOf(ctx, dir, id, rec)
	}
	if !isLazy || rec.Top == nil {
		return "", false, nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return "", false, fmt.Errorf("snapshot %s: kiln is stopping: %w", id, errdefs.ErrUnavailable)
	}
	m := l.mounts[id]
	if m != nil {
		select {
		case <-m.done:
			if m.err != nil {
				m = nil // try again
			}
		default:
		}
	}
	if m == nil {
		m = &lazyMount{done: make(chan struct{}), used: make(chan struct{})}
		l.mounts[id] = m
		l.mu.Unlock()
		// Remove renames the directory before it drops the mount: once
		// the mount is listed, either the directory is still there or
		// drop finds the mount.
		if !exists(filepath.Join(dir, lazyFile)) {
			m.err = fmt.Errorf("snapshot %s was removed: %w", id, errdefs.ErrNotFound)
		} else {
			mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lookupTimeout)
			m.path, m.err = l.mount(mctx, id, *rec.Top, m)
			cancel()
			if m.err != nil {
				log.G(ctx).WithError(m.err).WithFields(log.Fields{"snapshot": id, "image": rec.Top.Ref}).Warn("mounting a lazily loaded disk; building it from its layers instead")
			}
		}
		close(m.done)
	} else {
		l.mu.Unlock()
	}
	select {
	case <-m.done:
	case <-ctx.Done():
		return "", true, ctx.Err()
	}
	if errdefs.IsNotFound(m.err) {
		return "", true, m.err
	}
	if m.err != nil {
		return "", false, nil
	}
	if use {
		m.use()
	}
	return m.path, true, nil
}

// topOf finds, for a lazily loaded layer that came in for another image,
// an image of the caller's namespace whose top it is and that has a
// chunked rootfs of kiln's build, and records it; nil if there is none.
// (containerd pulls no layer it has, so kiln hears of such an image only
// here.) One search runs per snapshot at a time, within lookupTimeout,
// and a search that finds nothing is not made again for lookupTTL.
func (l *lazyImages) topOf(ctx context.Context, dir, id string, rec lazyLayer) *lazyTop {
	ns, ok := namespaces.Namespace(ctx)
	if l.images == nil || !ok || rec.Chain == "" {
		return nil
	}
	key := ns + "/" + id
	l.mu.Lock()
	for k, at := range l.noTop {
		if time.Since(at) > lookupTTL {
			delete(l.noTop, k)
		}
	}
	_, known := l.noTop[key]
	running := l.searches[key]
	if !known && running == nil {
		l.searches[key] = make(chan struct{})
	}
	l.mu.Unlock()
	switch {
	case known:
		return nil
	case running != nil:
		select {
		case <-running:
		case <-ctx.Done():
			return nil
		}
		rec, _, _ := readLazy(dir)
		return rec.Top
	}
	sctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	top, searched := l.searchTop(sctx, ns, dir, id, rec)
	l.mu.Lock()
	if top == nil && searched {
		l.noTop[key] = time.Now()
	}
	close(l.searches[key])
	delete(l.searches, key)
	l.mu.Unlock()
	return top
}

// searchTop is topOf's search; searched is false when it was cut short.
func (l *lazyImages) searchTop(ctx context.Context, ns, dir, id string, rec lazyLayer) (top *lazyTop, searched bool) {
	lg := log.G(ctx).WithFields(log.Fields{"snapshot": id, "namespace": ns})
	named, err := l.images.Named(ctx, ns, rec.Chain)
	if err != nil {
		lg.WithError(err).Warn("looking for the images of a lazily loaded layer")
		return nil, false
	}
	for _, n := range named {
		if _, err := name.ParseReference(n.Name); err != nil || strings.HasPrefix(n.Name, "sha256:") {
			continue // an image ID (CRI names images by it too), not a reference
		}
		lk := l.find(ctx, n.Name, n.Manifest)
		if ctx.Err() != nil {
			return nil, false
		}
		if lk.chunked == nil || len(lk.chainIDs) == 0 || lk.chainIDs[len(lk.chainIDs)-1] != rec.Chain {
			continue
		}
		recorded, wrote, err := l.markTop(dir, lazyTop{Ref: n.Name, Manifest: n.Manifest})
		if err != nil {
			lg.WithError(err).Warn("recording the image whose top a lazily loaded layer is")
			return nil, false
		}
		if wrote {
			lg.WithField("image", n.Name).Info("the image is loaded lazily: its layers came in for another")
			l.observe(shareLazy)
		}
		return recorded, true
	}
	return nil, true
}

// mount mounts the published rootfs of image top as the disk of snapshot
// id and starts its prefetch.
func (l *lazyImages) mount(ctx context.Context, id string, top lazyTop, m *lazyMount) (string, error) {
	lk := l.find(ctx, top.Ref, top.Manifest)
	if lk.chunked == nil {
		return "", fmt.Errorf("image %s (%s): no chunked rootfs of this build found in its registry", top.Ref, top.Manifest)
	}
	st, err := l.chunkStore()
	if err != nil {
		return "", fmt.Errorf("chunk cache: %w", err)
	}
	r, err := chunked.NewReader(lk.chunked.Index, lk.chunked.Fetcher, st, l.share.LazyTimeout)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", top.Ref, err)
	}
	dir := filepath.Join(l.root, lazyDir, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		r.Close()
		return "", err
	}
	disk, err := fusedisk.Mount(dir, r, fusedisk.Options{Name: diskFile, Timeout: l.share.LazyTimeout, AllowOther: os.Geteuid() == 0})
	if err != nil {
		r.Close()
		return "", fmt.Errorf("image %s: mounting its rootfs at %s: %w", top.Ref, dir, err)
	}
	m.disk, m.lazy = disk, convert.NewLazy(lk.img, lk.chunked, lk.key, r, l.root)
	pctx, stop := context.WithCancel(context.Background())
	m.stop, m.ended = stop, make(chan struct{})
	lg := log.G(ctx).WithFields(log.Fields{"snapshot": id, "image": top.Ref, "artifact": m.lazy.Artifact})
	go func() {
		defer close(m.ended)
		err := m.lazy.Prefetch(pctx, l.share.LazyPrefetch, prefetchWorkers)
		if err != nil {
			lg.WithError(err).Warn("prefetching a lazily loaded disk stopped")
		}
		if err == nil && pctx.Err() == nil && l.share.LazyPrefetch {
			if err := l.materialize(pctx, id, r); err != nil && pctx.Err() == nil {
				lg.WithError(err).Warn("writing a lazily loaded disk out whole")
			} else if err == nil {
				lg.Info("the lazily loaded disk has arrived whole: later containers use a local copy")
			}
		}
		// The boot profile: the reads of the first LazyBootWindow after
		// a container or view first asked for the disk.
		select {
		case <-m.used:
		case <-pctx.Done():
			return
		}
		select {
		case <-time.After(time.Until(m.usedAt.Add(l.share.LazyBootWindow))):
		case <-pctx.Done():
			return
		}
		if err := m.lazy.SaveProfile(); err != nil {
			lg.WithError(err).Warn("recording a boot profile")
		}
	}()
	lg.WithField("size", r.Size()).Info("serving a lazily loaded disk")
	return disk.Path(), nil
}

// materialize writes the disk of snapshot id, whose chunks have been
// fetched (any evicted since are fetched again), to the snapshot's
// directory as a built disk would be: later containers and views use
// that (as does the next kiln, which cannot serve the mount this one
// made), and the chunk cache may let its chunks go. The mount stays for
// what has it open.
func (l *lazyImages) materialize(ctx context.Context, id string, r *chunked.Reader) error {
	dst := filepath.Join(l.root, snapshotsDir, id, diskFile)
	if exists(dst) {
		return nil
	}
	wd, err := workdir.New(filepath.Join(l.root, tmpDir))
	if err != nil {
		return err
	}
	defer wd.Release()
	tmp := filepath.Join(wd.Path, diskFile)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(r.Size()); err != nil {
		return err
	}
	if err := r.CopyTo(ctx, f); err != nil {
		return err
	}
	// Synced before it takes its name: unlike a build, it has no record
	// to settle after a crash (see durable.go).
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Chmod(0o444); err != nil {
		return err
	}
	// A disk built meanwhile (after a mount failed) is the same bytes,
	// and stays.
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dst, unix.RENAME_NOREPLACE)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrExist) {
		return nil // the snapshot was removed meanwhile, or has its disk
	}
	return err
}

// drop unmounts, in the background, the lazily loaded disk of a removed
// snapshot: containerd's collector waits for the removal.
func (l *lazyImages) drop(ctx context.Context, id string) {
	ctx = context.WithoutCancel(ctx)
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.mounts[id]
	delete(l.mounts, id)
	if m == nil || l.closed {
		return // (close has the mounts)
	}
	l.leaving[m] = true
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		l.unmount(ctx, id, m)
	}()
}

// unmount unmounts a disk. One that is still open (a VMM that has no
// snapshot on it) is detached and served until it is closed.
func (l *lazyImages) unmount(ctx context.Context, id string, m *lazyMount) {
	<-m.done
	if m.err != nil {
		l.mu.Lock()
		delete(l.leaving, m)
		l.mu.Unlock()
		return
	}
	m.stop()
	<-m.ended
	if err := m.disk.Unmount(); err != nil {
		log.G(ctx).WithError(err).WithField("snapshot", id).Warn("unmounting a lazily loaded disk")
		return
	}
	go func() {
		m.disk.Wait()
		m.lazy.Close()
		os.Remove(filepath.Join(l.root, lazyDir, id))
		l.mu.Lock()
		delete(l.leaving, m)
		l.fetched += m.lazy.Stats().FetchedBytes
		l.mu.Unlock()
	}()
}

// stats returns the disks mounted, and the bytes fetched for them and
// for those unmounted since kiln started.
func (l *lazyImages) stats() (disks int, fetched int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fetched = l.fetched
	count := func(m *lazyMount) bool {
		select {
		case <-m.done:
			if m.err == nil {
				fetched += m.lazy.Stats().FetchedBytes
				return true
			}
		default:
		}
		return false
	}
	for _, m := range l.mounts {
		if count(m) {
			disks++
		}
	}
	for m := range l.leaving {
		count(m)
	}
	return disks, fetched
}

// close unmounts every lazily loaded disk. A VM still reading one gets
// I/O errors: its chunks are served by this process.
func (l *lazyImages) close(ctx context.Context) {
	l.mu.Lock()
	l.closed = true
	mounts := l.mounts
	l.mounts = map[string]*lazyMount{}
	for _, m := range mounts {
		l.leaving[m] = true
	}
	l.mu.Unlock()
	l.wg.Wait()
	for id, m := range mounts {
		l.unmount(ctx, id, m)
	}
}

// chunkBytes is the disk the chunk cache takes, 0 until it is open.
func (l *lazyImages) chunkBytes() int64 {
	if st := l.store.Load(); st != nil {
		return st.Size()
	}
	return 0
}

// lazyLayerBlob is a lazily loaded layer as a build reads it: its blob,
// streamed from the registry of the image it was pulled for, until ctx
// (the build's) ends or no byte arrives for stall.
func lazyLayerBlob(ctx context.Context, opts image.Options, stall time.Duration, rec lazyLayer) build.Layer {
	return build.Layer{
		Descriptor: layer.Descriptor{MediaType: rec.MediaType, Digest: rec.Digest, DiffID: rec.DiffID},
		Size:       rec.Size,
		Open: func() (io.ReadCloser, error) {
			ctx, cancel := context.WithCancel(ctx)
			rc, err := openLayerBlob(ctx, opts, rec)
			if err != nil {
				cancel()
				return nil, fmt.Errorf("layer %s of image %s, loaded lazily: %w", rec.Digest, rec.Ref, err)
			}
			return newStallReader(rc, stall, cancel), nil
		},
	}
}

func openLayerBlob(ctx context.Context, opts image.Options, rec lazyLayer) (io.ReadCloser, error) {
	t, err := image.Server(ctx, rec.Ref, opts)
	if err != nil {
		return nil, err
	}
	ly, err := remote.Layer(t.Ref.Context().Digest(rec.Digest.String()), t.Options...)
	if err != nil {
		return nil, err
	}
	return ly.Compressed()
}

// lazyStall is how long a registry may send nothing of a lazily loaded
// layer's blob.
func lazyStall(sh Share) time.Duration {
	if sh.LazyTimeout > 0 {
		return sh.LazyTimeout
	}
	return 30 * time.Second
}

// stallReader calls cancel, which ends the request under rc, when a
// read gets no byte for timeout: a registry that stops answering in the
// middle of a blob must not hold a build for good.
type stallReader struct {
	rc      io.ReadCloser
	timeout time.Duration
	timer   *time.Timer
	cancel  context.CancelFunc
	stalled atomic.Bool
}

func newStallReader(rc io.ReadCloser, timeout time.Duration, cancel context.CancelFunc) *stallReader {
	r := &stallReader{rc: rc, timeout: timeout, cancel: cancel}
	r.timer = time.AfterFunc(timeout, func() {
		r.stalled.Store(true)
		cancel()
	})
	r.timer.Stop()
	return r
}

func (r *stallReader) Read(p []byte) (int, error) {
	r.timer.Reset(r.timeout)
	n, err := r.rc.Read(p)
	r.timer.Stop()
	if err != nil && r.stalled.Load() {
		err = fmt.Errorf("no data from the registry for %s: %w", r.timeout, err)
	}
	return n, err
}

func (r *stallReader) Close() error {
	r.timer.Stop()
	r.cancel()
	return r.rc.Close()
}
