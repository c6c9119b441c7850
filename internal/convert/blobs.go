package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/directio"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/progress"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/workdir"
)

// blobCache reads a registry image's layer blobs through the cache's
// content store, which runs of kiln sharing the cache directory use at the
// same time.
//
//   - A missing blob is fetched by one run at a time: the blob's lock
//     (store.LockBlob), held exclusively, guards its fetch, and whoever
//     gets the lock next reads what the holder stored. The blob is
//     named into the content store only once its digest is checked.
//   - A cached blob is read under the lock held shared, so that kiln cache
//     prune does not evict it meanwhile.
//   - A cached blob is verified while it is read. One that is not what its
//     digest says is evicted with a warning, and the caller builds again,
//     which fetches it afresh (see evictions).
type blobCache struct {
	st      *store.Store
	cs      content.Store
	image   string // for log lines
	evicted atomic.Int64
}

func newBlobCache(st *store.Store, image string) *blobCache {
	return &blobCache{st: st, cs: st.Content(), image: image}
}

// evictions counts the damaged blobs evicted so far; a build that failed
// while it went up may succeed when run again. A nil cache has none.
func (c *blobCache) evictions() int64 {
	if c == nil {
		return 0
	}
	return c.evicted.Load()
}

// fetch returns layers that read their blobs through the cache. The first
// missing layer is streamed: unpacking reads it while it is being stored,
// so fetching and unpacking overlap. The other missing layers are fetched
// in the background meanwhile, three at a time in the image's order, and
// read from the cache when their turn comes.
func (c *blobCache) fetch(ctx context.Context, img *image.Image, rep progress.Reporter) ([]build.Layer, func() error) {
	var total int64
	for _, l := range img.Layers {
		total += l.Size
	}
	bar := rep.Bar("fetch", total, true)
	g, gctx := errgroup.WithContext(ctx)
	// The downloads wait for a slot in their goroutines, not here: the
	// build, and the streamed layer with it, starts at once. Each waits
	// until the one before it has its slot, so they start in order.
	slots := make(chan struct{}, 3)
	turn := make(chan struct{})
	close(turn)
	layers := make([]build.Layer, len(img.Layers))
	streamed := false
	for i, l := range img.Layers {
		// Each blob is checked here, as it is stored or read back: the
		// layer reader need not hash it again.
		l.Verified = true
		if _, err := c.cs.Info(ctx, l.Digest); err == nil || !streamed {
			streamed = streamed || err != nil
			layers[i] = build.Layer{Descriptor: l.Descriptor, Size: l.Size, Open: func() (io.ReadCloser, error) {
				return c.open(ctx, l, bar)
			}}
			continue
		}
		ready := make(chan struct{})
		var ferr error
		layers[i] = build.Layer{Descriptor: l.Descriptor, Size: l.Size, Open: func() (io.ReadCloser, error) {
			select {
			case <-ready:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if ferr != nil {
				return nil, ferr
			}
			return c.open(ctx, l, bar)
		}}
		prev, next := turn, make(chan struct{})
		turn = next
		g.Go(func() error {
			defer close(ready)
			select {
			case <-prev:
			case <-gctx.Done():
				ferr = gctx.Err()
				return ferr
			}
			select {
			case slots <- struct{}{}:
			case <-gctx.Done():
				ferr = gctx.Err()
				return ferr
			}
			close(next)
			defer func() { <-slots }()
			rc, err := c.open(gctx, l, bar)
			if err == nil {
				_, err = io.Copy(io.Discard, rc)
				rc.Close()
			}
			ferr = err
			return err
		})
	}
	return layers, func() error {
		err := g.Wait()
		bar.Done()
		return err
	}
}

// open reads a blob from the cache, or from its source while storing it
// in the cache.
func (c *blobCache) open(ctx context.Context, l image.Layer, bar progress.Bar) (io.ReadCloser, error) {
	desc := ocispec.Descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size}
	shared, err := c.st.LockBlob(ctx, desc.Digest, false)
	if err != nil {
		return nil, &layer.Error{Digest: l.Digest, Err: fmt.Errorf("caching: %w", err)}
	}
	if rc, err := c.cached(ctx, desc, shared); !errdefs.IsNotFound(err) {
		return rc, err
	}
	shared.Unlock()
	lock, err := c.st.LockBlob(ctx, desc.Digest, true)
	if err != nil {
		return nil, &layer.Error{Digest: l.Digest, Err: fmt.Errorf("caching: %w", err)}
	}
	unlock := lock.Unlock
	// The run that held the lock may have stored the blob.
	if rc, err := c.cached(ctx, desc, lock); !errdefs.IsNotFound(err) {
		return rc, err
	}
	// Written in a scratch directory of the cache, named into the
	// content store once checked (see teeBlob).
	wd, err := c.st.NewWorkDir()
	if err != nil {
		unlock()
		return nil, &layer.Error{Digest: l.Digest, Err: fmt.Errorf("caching: %w", err)}
	}
	f, err := os.OpenFile(filepath.Join(wd.Path, "blob"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		wd.Release()
		unlock()
		return nil, &layer.Error{Digest: l.Digest, Err: fmt.Errorf("caching: %w", err)}
	}
	// Unchecked by its source: check below is the one hash of it.
	rc, err := l.OpenUnchecked(ctx)
	if err != nil {
		f.Close()
		wd.Release()
		unlock()
		return nil, &layer.Error{Digest: l.Digest, Err: fmt.Errorf("fetching: %w", err)}
	}
	return &teeBlob{st: c.st, wd: wd, f: f, out: directio.NewStream(f), digester: desc.Digest.Algorithm().Digester(),
		src: rc, desc: desc, bar: bar, unlock: unlock}, nil
}

// cached opens a blob the cache holds, under the blob's lock, which the
// reader lets go when closed; errdefs.ErrNotFound if the cache does not
// hold the blob, and then the caller keeps the lock.
func (c *blobCache) cached(ctx context.Context, desc ocispec.Descriptor, lock *store.Lock) (io.ReadCloser, error) {
	ra, err := c.cs.ReaderAt(ctx, desc)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return nil, err
		}
		lock.Unlock()
		return nil, &layer.Error{Digest: desc.Digest, Err: fmt.Errorf("reading the cache: %w", err)}
	}
	return &cachedBlob{c: c, ctx: ctx, desc: desc, ra: ra, lock: lock, r: content.NewReader(ra), digester: desc.Digest.Algorithm().Digester()}, nil
}

// evict removes a damaged blob from the cache and returns the error its
// reader reports.
func (c *blobCache) evict(ctx context.Context, d, got digest.Digest) error {
	log.G(ctx).WithFields(log.Fields{"image": c.image, "layer": d, "content": got}).
		Warn("cached layer blob is damaged: evicting it, it will be fetched again")
	if err := c.cs.Delete(context.WithoutCancel(ctx), d); err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("layer", d).Warn("evicting a damaged blob")
	}
	c.evicted.Add(1)
	return &layer.Error{Digest: d, Err: fmt.Errorf("cached blob: %w: it holds %s", layer.ErrDigestMismatch, got)}
}

// cachedBlob reads a blob from the cache and checks its digest at the
// end. A reader that stops early may have stopped because the blob is
// damaged (a hole of zeros does not decompress), so Close then checks the
// whole blob.
type cachedBlob struct {
	c    *blobCache
	ctx  context.Context
	desc ocispec.Descriptor
	ra   content.ReaderAt
	lock *store.Lock

	mu       sync.Mutex // Close can come while a Read is under way
	r        io.Reader
	digester digest.Digester
	ended    bool // read to the end, and checked
	closed   bool
}

func (b *cachedBlob) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, os.ErrClosed
	}
	n, err := b.r.Read(p)
	b.digester.Hash().Write(p[:n])
	if err == io.EOF {
		b.ended = true
		if got := b.digester.Digest(); got != b.desc.Digest {
			return n, b.c.evict(b.ctx, b.desc.Digest, got)
		}
	}
	return n, err
}

func (b *cachedBlob) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	if !b.ended && b.ctx.Err() == nil {
		got, err := b.desc.Digest.Algorithm().FromReader(io.NewSectionReader(b.ra, 0, b.ra.Size()))
		if err == nil && got != b.desc.Digest {
			b.c.evict(b.ctx, b.desc.Digest, got) //nolint:errcheck // the reader's user has its own error
		}
	}
	defer b.lock.Unlock()
	return b.ra.Close()
}

// teeBlob passes a blob through while writing it to a file in the
// cache, around the page cache (it is read back only by a later run),
// names that file into the content store once the whole blob is checked,
// and lets go of the blob's lock when closed.
type teeBlob struct {
	mu       sync.Mutex // Close can come while a Read is under way
	st       *store.Store
	wd       *workdir.Dir
	f        *os.File
	out      *directio.Stream
	digester digest.Digester
	src      io.ReadCloser
	desc     ocispec.Descriptor
	bar      progress.Bar
	unlock   func()
	got      int64 // bytes passed on so far
	ended    bool  // out is closed
}

func (t *teeBlob) Read(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n, err := t.src.Read(p)
	if over := t.got + int64(n) - t.desc.Size; over > 0 {
		// Neither passed on nor stored.
		n -= int(over)
		err = &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("fetching: %w: the blob is longer than the %d bytes its manifest says", layer.ErrDigestMismatch, t.desc.Size)}
	}
	if n > 0 && !t.ended {
		if _, werr := t.out.Write(p[:n]); werr != nil {
			return n, &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("caching: %w", werr)}
		}
		t.digester.Hash().Write(p[:n])
		t.got += int64(n)
		t.bar.Add(int64(n))
	}
	if err == io.EOF && !t.ended {
		if cerr := t.check(); cerr != nil {
			return n, cerr
		}
		if cerr := t.store(); cerr != nil {
			return n, &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("caching: %w", cerr)}
		}
	}
	if err != nil && err != io.EOF {
		var lerr *layer.Error
		if !errors.As(err, &lerr) {
			err = &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("fetching: %w", err)}
		}
	}
	return n, err
}

// check is the one check a fetched blob gets (it is read unchecked).
func (t *teeBlob) check() error {
	if t.got != t.desc.Size {
		return &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("fetching: %w: the blob is %d bytes, its manifest says %d", layer.ErrDigestMismatch, t.got, t.desc.Size)}
	}
	if got := t.digester.Digest(); got != t.desc.Digest {
		return &layer.Error{Digest: t.desc.Digest, Err: fmt.Errorf("fetching: %w: the blob's digest is %s", layer.ErrDigestMismatch, got)}
	}
	return nil
}

// store finishes the checked blob's file, syncs it and names it into the
// content store.
func (t *teeBlob) store() error {
	t.ended = true
	if err := t.out.Close(); err != nil {
		return err
	}
	if err := t.f.Sync(); err != nil {
		return err
	}
	return t.st.AddBlob(t.desc.Digest, t.f.Name())
}

func (t *teeBlob) Close() error {
	t.src.Close() // first: it ends a Read waiting for the source
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.f == nil {
		return nil
	}
	if !t.ended {
		t.ended = true
		t.out.Close() //nolint:errcheck // the file is dropped
	}
	t.f.Close()
	t.f = nil
	t.wd.Release()
	t.unlock()
	return nil
}
