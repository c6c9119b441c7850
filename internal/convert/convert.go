// Package convert is `kiln convert`: resolve an image, fetch its layer
// blobs into the cache, build its ext4 rootfs once per chain ID and
// options, and copy it to the output.
package convert

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/progress"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Options configure a conversion.
type Options struct {
	Image    image.Options
	Build    build.Options
	Inject   inject.Options
	CacheDir string
	// CacheMaxSize, if positive, is the most the cache may take on disk
	// after the conversion: least recently used entries are evicted.
	CacheMaxSize int64
	Progress     progress.Reporter
	Share        Share
}

// Result is what a conversion produced; it is also the --json summary.
type Result struct {
	Image    string        `json:"image"`
	Digest   digest.Digest `json:"digest"`
	Platform string        `json:"platform"`
	ChainID  digest.Digest `json:"chain_id"`
	Size     int64         `json:"size"`
	Path     string        `json:"path"`
	Cached   bool          `json:"cached"`
	// Fetched says that the rootfs was published in the registry and
	// downloaded rather than built; Published is the artifact's digest
	// when this run published it.
	Fetched   bool   `json:"fetched,omitempty"`
	Published string `json:"published,omitempty"`
	// Init is the injected init, for the kernel command line's init=.
	Init string `json:"init,omitempty"`
	// Verity is the disk's dm-verity tree, with --verity.
	Verity  *verity.Info `json:"verity,omitempty"`
	Timings Timings      `json:"timings_ms"`
}

// Timings says where the time went, in milliseconds.
type Timings struct {
	Resolve int64 `json:"resolve"`
	Fetch   int64 `json:"fetch"`
	Unpack  int64 `json:"unpack"`
	Build   int64 `json:"build"`
	Copy    int64 `json:"copy"`
	Total   int64 `json:"total"`
}

// Convert writes the ext4 rootfs of the image src names to out; with out
// empty, it only makes sure the cache holds it.
func Convert(ctx context.Context, src, out string, opts Options) (*Result, error) {
	start := time.Now()
	rep := opts.Progress
	if rep == nil {
		rep = progress.Discard
	}
	cacheDir := opts.CacheDir
	if cacheDir == "" {
		cacheDir = store.DefaultDir()
	}
	if err := workdir.Private(cacheDir); err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	st, err := store.Open(cacheDir)
	if err != nil {
		return nil, err
	}
	img, err := image.Resolve(ctx, src, opts.Image)
	if err != nil {
		return nil, err
	}
	res := &Result{
		Image:    img.Name,
		Digest:   img.Digest,
		Platform: platforms.Format(img.Platform),
		ChainID:  img.ChainID(),
	}
	res.Timings.Resolve = time.Since(start).Milliseconds()
	set, err := inject.New(opts.Inject)
	if err != nil {
		return nil, err
	}
	opts.Build.Inject = set
	res.Init = set.InitPath()
	if opts.Share.Push && !img.Remote {
		return nil, fmt.Errorf("image %s: only an image in a registry can have a rootfs published beside it", img.Name)
	}
	key := build.Key(res.ChainID, opts.Build)
	// Held until the image is copied out: kiln cache prune and rm leave
	// it alone meanwhile.
	hold, err := st.UseRootfs(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	defer hold.Unlock()
	record := cacheRecord(key, img, res, opts)

	stamp := set.InitPath() != ""
	// finish completes the output, a copy of the cached image.
	finish := func(f *os.File) error {
		if !stamp {
			return nil
		}
		if err := stampConfig(ctx, st, f, img); err != nil {
			return err
		}
		if !opts.Build.Verity {
			return nil
		}
		// The config is this copy's own data: its tree is too.
		v, err := verity.AppendFile(f, key, false)
		res.Verity = &v
		return err
	}

	cached := st.RootfsPath(key)
	cleaned := make(chan struct{})
	written := false // out is complete
	if !st.HasRootfs(key) && img.Remote && opts.Share.Pull {
		fetchStart := time.Now()
		if out != "" && !opts.Share.Push {
			res.Fetched, err = fetchPublishedTo(ctx, st, img, record, out, opts, finish)
			written = res.Fetched
		} else {
			res.Fetched, err = fetchPublished(ctx, st, img, record, opts)
		}
		if err != nil {
			return nil, err
		}
		res.Timings.Fetch = time.Since(fetchStart).Milliseconds()
	}
	if res.Fetched {
		close(cleaned)
	} else if !st.HasRootfs(key) {
		var blobs *blobCache
		if img.Remote {
			blobs = newBlobCache(st, img.Name)
		}
		built, timings, wd, err := buildImage(ctx, st, img, record, opts.Build, blobs, rep)
		// A build that evicted a damaged cached blob runs again, fetching
		// it afresh; each round evicts another blob, so this ends.
		for n := int64(0); err != nil && blobs.evictions() > n; {
			n = blobs.evictions()
			log.G(ctx).WithError(err).WithField("image", img.Name).Warn("building again with the evicted blobs fetched afresh")
			built, timings, wd, err = buildImage(ctx, st, img, record, opts.Build, blobs, rep)
		}
		if err != nil {
			return nil, err
		}
		res.Timings.Fetch, res.Timings.Unpack, res.Timings.Build = timings.Fetch, timings.Unpack, timings.Build
		cached = built
		// Deleting the staging tree overlaps with the copy below.
		go func() { wd.Release(); close(cleaned) }()
	} else {
		res.Cached = true
		close(cleaned)
		if err := st.RecordUse(ctx, record); err != nil {
			log.G(ctx).WithError(err).WithField("image", img.Name).Warn("recording the use of a cached image")
		}
	}
	if opts.Share.Push {
		// A published rootfs fetched here is republished as it is.
		if res.Published, err = publish(ctx, st, img, cached, opts); err != nil {
			<-cleaned
			return nil, err
		}
	}
	if out == "" { // the cache is the output
		<-cleaned
		res.Path = cached
		res.Timings.Total = time.Since(start).Milliseconds()
		return res, nil
	}
	if !written {
		copyStart := time.Now()
		err = clone.AtomicThen(cached, out, 0o644, finish)
		<-cleaned
		if err != nil {
			return nil, fmt.Errorf("writing %s: %w", out, err)
		}
		res.Timings.Copy = time.Since(copyStart).Milliseconds()
	}
	rep.Wait()
	if opts.Build.Verity && !stamp {
		v, err := verity.Describe(out)
		if err != nil {
			return nil, err
		}
		res.Verity = &v
	}
	if res.Path, err = filepath.Abs(out); err != nil {
		res.Path = out
	}
	if fi, err := os.Stat(out); err == nil {
		res.Size = fi.Size()
	}
	if opts.CacheMaxSize > 0 {
		// The image just written is still held, so it stays even if
		// it alone is over the budget.
		if pr, err := st.Prune(ctx, opts.CacheMaxSize); err != nil {
			log.G(ctx).WithError(err).Warn("pruning the cache")
		} else if len(pr.Images)+len(pr.Blobs)+pr.Chunks.Count > 0 || pr.Left > opts.CacheMaxSize {
			log.G(ctx).WithFields(log.Fields{"images": len(pr.Images), "blobs": len(pr.Blobs), "chunks": pr.Chunks.Count, "freed": pr.Freed, "left": pr.Left, "in_use": pr.Skipped}).Info("pruned the cache")
		}
	}
	res.Timings.Total = time.Since(start).Milliseconds()
	return res, nil
}

// cacheRecord is what kiln cache ls shows about the image built under key.
func cacheRecord(key string, img *image.Image, res *Result, opts Options) store.Image {
	rec := store.Image{Key: key, Image: img.Name, Digest: img.Digest, Platform: res.Platform, ChainID: res.ChainID}
	for _, l := range img.Layers {
		rec.Layers = append(rec.Layers, l.Digest)
	}
	rec.Options = map[string]string{"size": "auto", "writer": build.DefaultWriter.Name()}
	if opts.Build.Size > 0 {
		rec.Options["size"] = strconv.FormatInt(opts.Build.Size, 10)
	}
	if opts.Build.Writer != nil {
		rec.Options["writer"] = opts.Build.Writer.Name()
	}
	if len(opts.Inject.Pieces) > 0 {
		var pieces []string
		for _, p := range opts.Inject.Pieces {
			pieces = append(pieces, string(p))
		}
		rec.Options["inject"] = strings.Join(pieces, ",")
	}
	if opts.Inject.Dir != "" {
		rec.Options["inject_dir"] = opts.Inject.Dir
	}
	if opts.Inject.Force {
		rec.Options["force"] = "true"
	}
	return rec
}

// stampConfig writes the image's config into its copy of a disk built
// with the init piece: the cached disk is shared by every image with the
// same layers.
func stampConfig(ctx context.Context, st *store.Store, f *os.File, img *image.Image) error {
	wd, err := st.NewWorkDir()
	if err != nil {
		return err
	}
	defer wd.Release()
	return inject.StampConfig(ctx, f, img.ConfigJSON, "", build.Epoch, wd.Path)
}

// buildImage fetches what is missing and builds the rootfs into the cache.
// On success the caller releases the work directory.
func buildImage(ctx context.Context, st *store.Store, img *image.Image, record store.Image, opts build.Options, blobs *blobCache, rep progress.Reporter) (_ string, t Timings, _ *workdir.Dir, err error) {
	wd, err := st.NewWorkDir()
	if err != nil {
		return "", t, nil, err
	}
	defer func() {
		if err != nil {
			wd.Release()
		}
	}()

	layers := make([]build.Layer, len(img.Layers))
	fetchStart := time.Now()
	fetchCtx, cancelFetch := context.WithCancel(ctx)
	defer cancelFetch()
	var fetchWait func() error
	if blobs != nil {
		layers, fetchWait = blobs.fetch(fetchCtx, img, rep)
	} else {
		for i, l := range img.Layers {
			layers[i] = build.Layer{Descriptor: l.Descriptor, Size: l.Size, Open: l.Open}
		}
	}
	out := filepath.Join(wd.Path, "rootfs.ext4")
	res, err := build.Rootfs(ctx, build.Request{ChainID: img.ChainID(), Layers: layers, Out: out, WorkDir: wd.Path, Options: opts}, rep)
	if fetchWait != nil {
		if err != nil {
			cancelFetch() // a failed build needs no more blobs
		}
		// A fetch error reaches the build through Open, so the build's
		// error already says it; a clean build means every fetch worked.
		_ = fetchWait()
		t.Fetch = time.Since(fetchStart).Milliseconds()
	}
	if err != nil {
		return "", t, nil, fmt.Errorf("image %s: %w", img.Name, err)
	}
	t.Unpack, t.Build = res.Unpack.Milliseconds(), res.Build.Milliseconds()
	path, err := st.PublishRootfs(ctx, out, record)
	return path, t, wd, err
}
