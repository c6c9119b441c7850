package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	snpkg "github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/share"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Share says whether kiln serve uses and publishes root filesystems kept
// beside their images in the registry (see internal/share). Both need to
// know which image a layer was pulled for: containerd says so in labels
// when the snapshotter's proxy plugin exports
// enable_remote_snapshot_annotations = "true" (kiln containerd-config
// writes it), and CRI when its snapshot annotations are on.
type Share struct {
	// Pull looks for a published rootfs of an image's top layer before
	// building its disk, and uses the first that verifies.
	Pull bool
	// Push publishes the disks kiln builds for an image's top layer.
	Push bool
	// Lazy loads an image with a chunked rootfs of kiln's build
	// published beside it lazily (see lazy.go): containerd downloads
	// none of its layers, and its disk's chunks are fetched when first
	// read, each read waiting at most LazyTimeout (0: 30s). LazyPrefetch
	// fetches the rest of the disk in the background, after the chunks
	// its boot read before (the reads of the LazyBootWindow after its
	// first container or view), and then writes the disk out whole for
	// later containers. The chunk
	// cache keeps within LazyCacheMaxSize bytes (0: no limit), least
	// recently used first out.
	Lazy             bool
	LazyTimeout      time.Duration
	LazyPrefetch     bool
	LazyBootWindow   time.Duration
	LazyCacheMaxSize int64
	// Image says how registries are reached: hosts.toml, insecure
	// registries. Credentials are the docker config's of the user kiln
	// runs as.
	Image image.Options
}

// imageSource is the image a snapshot is the top layer of.
type imageSource struct {
	ref      string
	manifest digest.Digest
}

func (s imageSource) known() bool { return s.ref != "" }

// sourceOf reads, from a committed layer's labels, the image it is the
// top layer of. containerd labels every layer it unpacks with the image
// it pulls and the layers from this one up; a layer with itself alone
// above it is the top. A base layer shared with other images is not
// published under one of them.
func sourceOf(labels map[string]string) (imageSource, bool) {
	ref, m := labels[snpkg.TargetRefLabel], labels[snpkg.TargetManifestDigestLabel]
	layer, above := labels[snpkg.TargetLayerDigestLabel], labels[snpkg.TargetImageLayersLabel]
	if ref == "" || layer == "" || above != layer {
		return imageSource{}, false
	}
	d, err := digest.Parse(m)
	if err != nil {
		return imageSource{}, false
	}
	return imageSource{ref: ref, manifest: d}, true
}

// fetchPublished writes a published rootfs of the chain's build into out,
// which must not exist, if the image's registry has one that verifies.
// Whatever goes wrong is logged and the disk is built instead.
func (b *diskBuilder) fetchPublished(ctx context.Context, chain chainLayers, opts build.Options, out string) bool {
	src := chain.image
	lg := log.G(ctx).WithFields(log.Fields{"image": src.ref, "manifest": src.manifest.String(), "chain": chain.chainID.String()})
	t, err := image.Server(ctx, src.ref, b.share.Image)
	if err != nil {
		lg.WithError(err).Warn("cannot reach the image's registry for a published rootfs; building the disk")
		return false
	}
	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		lg.WithError(err).Warn("fetching a published rootfs; building the disk")
		return false
	}
	found, err := share.Fetch(ctx, t, src.manifest, build.IdentityOf(chain.chainID, opts), f, share.MaxImageSize(opts, filepath.Dir(out)))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil || !found {
		os.Remove(out)
		if ctx.Err() != nil {
			return false // called off: the build ends the same way
		}
		if err != nil {
			lg.WithError(err).Warn("fetching a published rootfs; building the disk")
		}
		b.observeShare(shareBuilt)
		return false
	}
	lg.Info("using the published rootfs")
	b.observeShare(shareFetched)
	return true
}

// maxQueuedPublishes bounds the disks waiting to be published, each
// holding its file open: a registry that refuses or does not answer must
// not pin every disk kiln builds.
const maxQueuedPublishes = 8

// publishLater publishes the disk just built for the chain in the
// background, one at a time; the disk's file is opened first, so that
// its removal meanwhile does not matter, and the disk stays pinned, so
// that the sweep does not turn it back into its layer's data file (see
// store.go) under the upload.
func (b *diskBuilder) publishLater(ctx context.Context, disk string, chain chainLayers, opts build.Options) {
	f, err := os.Open(disk)
	if err != nil {
		log.G(ctx).WithError(err).WithField("disk", disk).Warn("publishing a disk")
		return
	}
	lg := log.G(ctx).WithFields(log.Fields{"image": chain.image.ref, "chain": chain.chainID.String()})
	id := filepath.Base(filepath.Dir(disk))
	b.mu.Lock()
	full := b.queued >= maxQueuedPublishes
	if !full {
		b.queued++
		b.pins[id]++
	}
	b.mu.Unlock()
	if full {
		f.Close()
		lg.Warnf("not publishing the disk: %d disks already wait to be published", maxQueuedPublishes)
		b.observeShare(sharePublishFailed)
		return
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		defer f.Close()
		defer func() {
			b.mu.Lock()
			b.queued--
			if b.pins[id]--; b.pins[id] <= 0 {
				delete(b.pins, id)
			}
			b.mu.Unlock()
		}()
		select {
		case b.publishing <- struct{}{}:
			defer func() { <-b.publishing }()
		case <-b.ctx.Done():
			return
		}
		ctx := log.WithLogger(b.ctx, lg)
		if err := b.publish(ctx, f, chain, opts); err != nil {
			lg.WithError(err).Warn("publishing the disk beside its image failed")
			b.observeShare(sharePublishFailed)
			return
		}
		b.observeShare(sharePublished)
	}()
}

func (b *diskBuilder) publish(ctx context.Context, f *os.File, chain chainLayers, opts build.Options) error {
	t, err := image.Server(ctx, chain.image.ref, b.share.Image)
	if err != nil {
		return err
	}
	wd, err := workdir.New(filepath.Join(b.root, tmpDir))
	if err != nil {
		return err
	}
	defer wd.Release()
	_, err = share.Publish(ctx, t, chain.image.manifest, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), build.IdentityOf(chain.chainID, opts), wd.Path)
	return err
}

// What happened to a disk that could be shared, as ObserveShare hears it.
const (
	shareFetched       = "fetched"        // a published rootfs was used
	shareBuilt         = "built"          // none was found, or none verified
	sharePublished     = "published"      // a disk kiln built was published
	sharePublishFailed = "publish_failed" // publishing it failed
	shareLazy          = "lazy"           // an image was loaded lazily
)

func (b *diskBuilder) observeShare(result string) {
	if b.onShare != nil {
		b.onShare(result)
	}
}

// ShareResults lists what ObserveShare may be told.
var ShareResults = []string{shareFetched, shareBuilt, sharePublished, sharePublishFailed, shareLazy}
