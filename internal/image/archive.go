package image

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/layer"
)

// fromArchive reads a `docker save` tarball, "FILE" or "FILE:REPO:TAG" for
// archives holding several images.
func fromArchive(spec string, want ocispec.Platform) (*Image, error) {
	file, ref := spec, ""
	if _, err := os.Stat(spec); err != nil {
		if i := strings.IndexByte(spec, ':'); i > 0 {
			file, ref = spec[:i], spec[i+1:]
		}
	}
	if _, err := os.Stat(file); err != nil {
		return nil, fmt.Errorf("docker archive: %w", err)
	}
	var tag *name.Tag
	if ref != "" {
		t, err := name.NewTag(ref)
		if err != nil {
			return nil, fmt.Errorf("docker archive tag %q: %w", ref, err)
		}
		tag = &t
	}
	img, err := tarball.ImageFromPath(file, tag)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: %w", file, err)
	}
	out, err := describeArchive(img, want)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: %w", file, err)
	}
	return out, nil
}

// describeArchive is describe for docker archives, whose layers are
// usually plain tars: kiln reads them uncompressed, so the blob it
// verifies is the tar itself and its digest is the diffID. (Asking
// go-containerregistry for the compressed form would gzip every layer.)
// The image's manifest and digest are not asked for either, for the same
// reason: the config digest (Docker's image ID) identifies it instead.
func describeArchive(img v1.Image, want ocispec.Platform) (*Image, error) {
	raw, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	cfg, err := parseConfig(raw)
	if err != nil {
		return nil, err
	}
	plat := ocispec.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}
	if err := checkPlatform(plat, want); err != nil {
		return nil, err
	}
	out := &Image{
		Digest:     digest.FromBytes(raw),
		Platform:   plat,
		Config:     cfg,
		ConfigJSON: raw,
	}
	for _, diffID := range cfg.RootFS.DiffIDs {
		h, err := v1.NewHash(diffID.String())
		if err != nil {
			return nil, fmt.Errorf("diffID %s: %w", diffID, err)
		}
		out.Layers = append(out.Layers, Layer{
			Descriptor: layer.Descriptor{MediaType: layer.MediaTypeDockerLayerPlain, Digest: diffID, DiffID: diffID},
			Size:       -1,
			open: func() (io.ReadCloser, error) {
				l, err := img.LayerByDiffID(h)
				if err != nil {
					return nil, err
				}
				return l.Uncompressed()
			},
		})
	}
	return out, nil
}
