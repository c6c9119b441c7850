package convert

import (
	"context"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/build"
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
	found, err := share.Fetch(ctx, server, img.Digest, build.IdentityOf(img.ChainID(), opts.Build), out, maxImageSize(opts.Build, wd.Path))
	if err != nil {
		err = fmt.Errorf("image %s: fetching its published rootfs: %w", img.Name, err)
	}
	if err != nil || !found {
		return false, err
	}
	if _, err := st.PublishRootfs(ctx, out, record); err != nil {
		return false, err
	}
	return true, nil
}

// maxImageSize bounds the image a published artifact may make kiln
// write: what a build with these options could make (the size asked
// for, or room for the image_bytes limit), and without either no more
// than the disk under dir has free. An artifact claiming more is not
// downloaded.
func maxImageSize(opts build.Options, dir string) int64 {
	switch {
	case opts.Size > 0:
		return opts.Size + opts.Size/64 + 1<<20 // and a verity tree
	case opts.Limits.ImageBytes > 0:
		return 2*opts.Limits.ImageBytes + 1<<30
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
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
	h, err := share.Publish(ctx, server, img.Digest, rootfs, build.IdentityOf(img.ChainID(), opts.Build), wd.Path)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	return h.String(), nil
}
