package convert

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/share"
	"github.com/kilnfs/kiln/internal/store"
)

// Share says whether a conversion uses and publishes root filesystems
// kept beside their images in the registry (see internal/share).
type Share struct {
	// Pull looks for a published rootfs of the same build before
	// building, and uses the first that verifies.
	Pull bool
	// Push publishes the rootfs after the conversion.
	Push bool
	// ChunkSize, if set, makes Push publish the rootfs cut into chunks
	// of that size, for kiln mount, rather than whole.
	ChunkSize int64
}

// fetchPublished downloads a published rootfs of the build into the
// cache, if the registry has one that verifies.
func fetchPublished(ctx context.Context, st *store.Store, img *image.Image, record store.Image, opts Options) (bool, error) {
	server, err := image.Server(ctx, img.Name, opts.Image)
	if err != nil {
		return false, fmt.Errorf("image %s: %w", img.Name, err)
	}
	wd, err := st.NewWorkDir()
	if err != nil {
		return false, err
	}
	defer wd.Release()
	out := filepath.Join(wd.Path, "rootfs.ext4")
	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return false, err
	}
	defer f.Close()
	found, err := share.Fetch(ctx, server, img.Digest, build.IdentityOf(img.ChainID(), opts.Build), f, share.MaxImageSize(opts.Build, wd.Path))
	if err != nil {
		return false, fmt.Errorf("image %s: fetching its published rootfs: %w", img.Name, err)
	}
	if !found {
		return false, nil
	}
	// The cache's images are durable before they are recorded.
	if err := f.Sync(); err != nil {
		return false, err
	}
	if _, err := st.PublishRootfs(ctx, out, record); err != nil {
		return false, err
	}
	return true, nil
}

// errNotPublished ends the writing of an output no published rootfs
// filled.
var errNotPublished = errors.New("no published rootfs")

// fetchPublishedTo downloads a published rootfs of the build straight
// into out, where finish completes it as it does a copy of a cached
// image: the image is written once. The cache keeps it only where that
// costs no second copy, sharing the output's blocks (a reflink).
func fetchPublishedTo(ctx context.Context, st *store.Store, img *image.Image, record store.Image, out string, opts Options, finish func(*os.File) error) (bool, error) {
	server, err := image.Server(ctx, img.Name, opts.Image)
	if err != nil {
		return false, fmt.Errorf("image %s: %w", img.Name, err)
	}
	id := build.IdentityOf(img.ChainID(), opts.Build)
	err = clone.Write(out, 0o644, func(f *os.File) error {
		found, err := share.Fetch(ctx, server, img.Digest, id, f, share.MaxImageSize(opts.Build, filepath.Dir(out)))
		if err != nil {
			return fmt.Errorf("image %s: fetching its published rootfs: %w", img.Name, err)
		}
		if !found {
			return errNotPublished
		}
		if err := cacheShared(ctx, st, f, record); err != nil {
			log.G(ctx).WithError(err).WithField("image", img.Name).Info("the published rootfs is not kept in the cache: it would be a second copy (a later convert downloads it again)")
		}
		return finish(f)
	})
	if errors.Is(err, errNotPublished) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("writing %s: %w", out, err)
	}
	return true, nil
}

// cacheShared puts a reflink of the image in f into the cache.
func cacheShared(ctx context.Context, st *store.Store, f *os.File, record store.Image) error {
	wd, err := st.NewWorkDir()
	if err != nil {
		return err
	}
	defer wd.Release()
	p := filepath.Join(wd.Path, "rootfs.ext4")
	if err := clone.Reflink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), p, 0o644); err != nil {
		return err
	}
	if err := syncFile(p); err != nil {
		return err
	}
	_, err = st.PublishRootfs(ctx, p, record)
	return err
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// publish puts the cached rootfs beside the image in its registry (the
// registry itself, not a mirror).
func publish(ctx context.Context, st *store.Store, img *image.Image, rootfs string, opts Options) (string, error) {
	server, err := image.Server(ctx, img.Name, opts.Image)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	wd, err := st.NewWorkDir()
	if err != nil {
		return "", err
	}
	defer wd.Release()
	id := build.IdentityOf(img.ChainID(), opts.Build)
	var h v1.Hash
	if opts.Share.ChunkSize > 0 {
		h, err = share.PublishChunked(ctx, server, img.Digest, rootfs, id, opts.Share.ChunkSize, wd.Path)
	} else {
		h, err = share.Publish(ctx, server, img.Digest, rootfs, id, wd.Path)
	}
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	return h.String(), nil
}
