// Package image resolves what the user names (a registry reference, an OCI
// image layout or a docker save archive) to one platform's image: its
// config and its layers, each a blob that can be opened as a stream.
// go-containerregistry reads registries and layouts, each ending up as a
// v1.Image; kiln reads docker archives' layers itself (see describeArchive).
package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/platforms"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/layer"
)

// Image is one platform's image.
type Image struct {
	// Name is the source as the user wrote it.
	Name string
	// Digest is the manifest digest.
	Digest digest.Digest
	// Platform is the platform the image was selected for.
	Platform ocispec.Platform
	// Config is the image configuration and ConfigJSON its exact bytes.
	Config     ocispec.Image
	ConfigJSON []byte
	Layers     []Layer
	// Remote is set for registry images, whose blobs kiln caches.
	Remote bool
}

// ChainID identifies the image's root filesystem (image-spec config.md).
func (i *Image) ChainID() digest.Digest {
	return identity.ChainID(i.Config.RootFS.DiffIDs)
}

// Layer is one layer blob of an image.
type Layer struct {
	layer.Descriptor
	Size      int64
	open      func() (io.ReadCloser, error)
	unchecked func(context.Context) (io.ReadCloser, error) // nil: open
}

// Open streams the layer's blob from its source. A registry's blob is
// checked against its digest as it ends.
func (l Layer) Open() (io.ReadCloser, error) { return l.open() }

// OpenUnchecked streams the blob like Open, but leaves a registry's
// blob unchecked: for a caller that checks it anyway, as kiln's blob
// cache does where it stores it, so that the blob is hashed once. Ending
// ctx ends the download.
func (l Layer) OpenUnchecked(ctx context.Context) (io.ReadCloser, error) {
	if l.unchecked == nil {
		return l.open()
	}
	return l.unchecked(ctx)
}

// Options say how to resolve a source.
type Options struct {
	// Platform selects an image from a multi-platform index, e.g.
	// "linux/arm64/v8"; a single-platform image must be for it. Empty
	// means the host's platform, matched as containerd does.
	Platform string
	// Insecure lists registries (host[:port]) that may be reached over
	// plain HTTP or with unverified TLS; loopback registries always may.
	Insecure []string
	// UserAgent is sent to registries.
	UserAgent string
	// HostsDir holds containerd-style hosts.toml files (mirrors, TLS,
	// headers) per registry; empty: none.
	HostsDir string
}

// ErrPlatformNotFound is wrapped when an image has nothing for the
// requested platform: an index without a matching manifest, or a single
// manifest whose config names another platform.
var ErrPlatformNotFound = errors.New("no image for the requested platform")

// Resolve finds the image that src names.
//
//	docker.io/library/debian:bookworm, 127.0.0.1:5000/app@sha256:...   a registry
//	oci:DIR[:TAG]                                                      an OCI image layout
//	docker-archive:FILE                                                a `docker save` tarball
func Resolve(ctx context.Context, src string, opts Options) (*Image, error) {
	want := platforms.DefaultSpec()
	if opts.Platform != "" {
		p, err := platforms.Parse(opts.Platform)
		if err != nil {
			return nil, fmt.Errorf("platform %q: %w", opts.Platform, err)
		}
		want = p
	}
	want = platforms.Normalize(want)
	var (
		img *Image
		err error
	)
	switch {
	case strings.HasPrefix(src, "oci:"):
		img, err = fromLayout(strings.TrimPrefix(src, "oci:"), want)
	case strings.HasPrefix(src, "docker-archive:"):
		img, err = fromArchive(strings.TrimPrefix(src, "docker-archive:"), want)
	default:
		img, err = fromRegistry(ctx, src, want, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", src, err)
	}
	img.Name = src
	return img, nil
}

// index is the part of an image index kiln needs; registries and layouts
// both provide it.
type index interface {
	IndexManifest() (*v1.IndexManifest, error)
	Image(v1.Hash) (v1.Image, error)
	ImageIndex(v1.Hash) (v1.ImageIndex, error)
}

// selectPlatform picks the best image for want from an index, following
// nested indexes, and lists what the index offers when nothing matches.
func selectPlatform(idx index, want ocispec.Platform) (v1.Image, ocispec.Platform, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, ocispec.Platform{}, fmt.Errorf("reading index: %w", err)
	}
	if len(m.Manifests) == 0 {
		return nil, ocispec.Platform{}, errors.New("the image index is empty")
	}
	matcher := platforms.Only(want)
	var (
		best     *v1.Descriptor
		bestPlat ocispec.Platform
		offered  []string
	)
	for i := range m.Manifests {
		d := &m.Manifests[i]
		if d.MediaType.IsIndex() {
			img, p, err := selectPlatform(nestedIndex{idx, d.Digest}, want)
			if err == nil {
				return img, p, nil
			}
			if !errors.Is(err, ErrPlatformNotFound) {
				return nil, ocispec.Platform{}, err
			}
			continue
		}
		if !d.MediaType.IsImage() {
			continue
		}
		if d.Platform == nil {
			offered = append(offered, "unknown")
			continue
		}
		p := ocispec.Platform{
			OS: d.Platform.OS, Architecture: d.Platform.Architecture, Variant: d.Platform.Variant,
			OSVersion: d.Platform.OSVersion, OSFeatures: d.Platform.OSFeatures,
		}
		if p.OS == "unknown" && p.Architecture == "unknown" {
			continue // attestation manifests
		}
		offered = append(offered, platforms.Format(p))
		if matcher.Match(p) && (best == nil || matcher.Less(p, bestPlat)) {
			best, bestPlat = d, p
		}
	}
	if best == nil {
		return nil, ocispec.Platform{}, fmt.Errorf("%w %s; the index offers: %s",
			ErrPlatformNotFound, platforms.Format(want), strings.Join(offered, ", "))
	}
	img, err := idx.Image(best.Digest)
	if err != nil {
		return nil, ocispec.Platform{}, fmt.Errorf("manifest %s: %w", best.Digest, err)
	}
	return img, bestPlat, nil
}

type nestedIndex struct {
	parent index
	digest v1.Hash
}

func (n nestedIndex) child() (v1.ImageIndex, error) { return n.parent.ImageIndex(n.digest) }

func (n nestedIndex) IndexManifest() (*v1.IndexManifest, error) {
	c, err := n.child()
	if err != nil {
		return nil, err
	}
	return c.IndexManifest()
}

func (n nestedIndex) Image(h v1.Hash) (v1.Image, error) {
	c, err := n.child()
	if err != nil {
		return nil, err
	}
	return c.Image(h)
}

func (n nestedIndex) ImageIndex(h v1.Hash) (v1.ImageIndex, error) {
	c, err := n.child()
	if err != nil {
		return nil, err
	}
	return c.ImageIndex(h)
}

// blobOpener opens a layer blob of a v1.Image; the sources differ in
// whether the stream is the stored (compressed) or the uncompressed form,
// and in whether it is checked.
type blobOpener func(img v1.Image, d v1.Descriptor, diffID v1.Hash) (io.ReadCloser, error)

func openCompressed(img v1.Image, d v1.Descriptor, _ v1.Hash) (io.ReadCloser, error) {
	l, err := img.LayerByDigest(d.Digest)
	if err != nil {
		return nil, err
	}
	return l.Compressed()
}

// uncheckedOpener opens a layer blob of a v1.Image without checking it.
type uncheckedOpener func(ctx context.Context, img v1.Image, d v1.Descriptor, diffID v1.Hash) (io.ReadCloser, error)

// describe turns a v1.Image into an Image: manifest, config, and layers
// paired with their diffIDs, opened with open and, for OpenUnchecked,
// with unchecked when it is not nil.
func describe(img v1.Image, plat ocispec.Platform, want ocispec.Platform, open blobOpener, unchecked uncheckedOpener) (*Image, error) {
	mf, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	raw, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	cfg, err := parseConfig(raw)
	if err != nil {
		return nil, err
	}
	if len(cfg.RootFS.DiffIDs) != len(mf.Layers) {
		return nil, fmt.Errorf("manifest has %d layers but the config lists %d diffIDs", len(mf.Layers), len(cfg.RootFS.DiffIDs))
	}
	if plat.OS == "" {
		// A plain manifest: the config says what it is for.
		plat = ocispec.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}
		if err := checkPlatform(plat, want); err != nil {
			return nil, err
		}
	}
	d, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("manifest digest: %w", err)
	}
	out := &Image{
		Digest:     digest.Digest(d.String()),
		Platform:   plat,
		Config:     cfg,
		ConfigJSON: raw,
	}
	for i, ld := range mf.Layers {
		diffID := cfg.RootFS.DiffIDs[i]
		h, err := v1.NewHash(diffID.String())
		if err != nil {
			return nil, fmt.Errorf("diffID %d: %w", i, err)
		}
		ld := ld
		l := Layer{
			Descriptor: layer.Descriptor{
				MediaType: string(ld.MediaType),
				Digest:    digest.Digest(ld.Digest.String()),
				DiffID:    diffID,
			},
			Size: ld.Size,
			open: func() (io.ReadCloser, error) { return open(img, ld, h) },
		}
		if unchecked != nil {
			l.unchecked = func(ctx context.Context) (io.ReadCloser, error) { return unchecked(ctx, img, ld, h) }
		}
		if err := layer.CheckMediaType(l.MediaType); err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		out.Layers = append(out.Layers, l)
	}
	return out, nil
}

func parseConfig(raw []byte) (ocispec.Image, error) {
	var cfg ocispec.Image
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return cfg, fmt.Errorf("parsing config: %w", err)
	}
	if cfg.RootFS.Type != "layers" && cfg.RootFS.Type != "" {
		return cfg, fmt.Errorf("config rootfs type %q is not \"layers\"", cfg.RootFS.Type)
	}
	return cfg, nil
}

// checkPlatform refuses a single-platform image that was built for another
// platform than the one asked for (the host's unless the user said), with
// the same matcher an index is searched with, as containerd does. An image
// that does not say its platform is taken as it is.
func checkPlatform(p, want ocispec.Platform) error {
	if p.OS == "" || p.Architecture == "" {
		return nil
	}
	if !platforms.Only(want).Match(platforms.Normalize(p)) {
		return fmt.Errorf("%w %s; the image offers only %s", ErrPlatformNotFound, platforms.Format(want), platforms.Format(p))
	}
	return nil
}
