// Package convert is `kiln convert`: resolve an image, fetch its layer
// blobs into the cache, build its ext4 rootfs once per chain ID and
// options, and copy it to the output.
package convert

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
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
	Progress progress.Reporter
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

// Convert writes the ext4 rootfs of the image src names to out.
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
	key := build.Key(res.ChainID, opts.Build)

	cached := st.RootfsPath(key)
	cleaned := make(chan struct{})
	if !st.HasRootfs(key) {
		var blobs *blobCache
		if img.Remote {
			if blobs, err = newBlobCache(st.Content(), cacheDir, img.Name); err != nil {
				return nil, err
			}
		}
		built, timings, wd, err := buildImage(ctx, st, img, key, opts.Build, blobs, rep)
		// A build that evicted a damaged cached blob runs again, fetching
		// it afresh; each round evicts another blob, so this ends.
		for n := int64(0); err != nil && blobs.evictions() > n; {
			n = blobs.evictions()
			log.G(ctx).WithError(err).WithField("image", img.Name).Warn("building again with the evicted blobs fetched afresh")
			built, timings, wd, err = buildImage(ctx, st, img, key, opts.Build, blobs, rep)
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
	}
	copyStart := time.Now()
	stamp := set.InitPath() != ""
	err = clone.AtomicThen(cached, out, 0o644, func(f *os.File) error {
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
	})
	<-cleaned
	if err != nil {
		return nil, fmt.Errorf("writing %s: %w", out, err)
	}
	rep.Wait()
	res.Timings.Copy = time.Since(copyStart).Milliseconds()
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
	res.Timings.Total = time.Since(start).Milliseconds()
	return res, nil
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
func buildImage(ctx context.Context, st *store.Store, img *image.Image, key string, opts build.Options, blobs *blobCache, rep progress.Reporter) (_ string, t Timings, _ *workdir.Dir, err error) {
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
	path, err := st.PublishRootfs(out, key)
	return path, t, wd, err
}
