package convert

import (
	"context"
	"fmt"
	"path/filepath"

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
	targets, err := image.Targets(ctx, img.Name, opts.Image)
	if err != nil {
		return false, fmt.Errorf("image %s: %w", img.Name, err)
	}
	wd, err := st.NewWorkDir()
	if err != nil {
		return false, err
	}
	defer wd.Release()
	out := filepath.Join(wd.Path, "rootfs.ext4")
	found, err := share.Fetch(ctx, targets, img.Digest, build.IdentityOf(img.ChainID(), opts.Build), out)
	if err != nil || !found {
		return false, err
	}
	if _, err := st.PublishRootfs(ctx, out, record); err != nil {
		return false, err
	}
	return true, nil
}

// publish puts the cached rootfs beside the image in its registry (the
// registry itself, not a mirror).
func publish(ctx context.Context, st *store.Store, img *image.Image, rootfs string, opts Options) (string, error) {
	if !img.Remote {
		return "", fmt.Errorf("image %s: only an image in a registry can have a rootfs published beside it", img.Name)
	}
	targets, err := image.Targets(ctx, img.Name, opts.Image)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	wd, err := st.NewWorkDir()
	if err != nil {
		return "", err
	}
	defer wd.Release()
	h, err := share.Publish(ctx, targets[len(targets)-1], img.Digest, rootfs, build.IdentityOf(img.ChainID(), opts.Build), wd.Path)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	return h.String(), nil
}
