package differ

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/epoch"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/ext4layer"
	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/guest"
)

// Compare writes the difference between two sets of kiln's mounts (lower
// usually a view of the container's parent, upper the container) as an
// OCI layer to the content store. The disks are read in userspace, and a
// container's disk only while nothing uses it: a running guest would
// change it under the reader.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	lo, ok := d.snapshots.Disks(lower)
	if !ok {
		return ocispec.Descriptor{}, errdefs.ErrNotImplemented
	}
	up, ok := d.snapshots.Disks(upper)
	if !ok {
		return ocispec.Descriptor{}, errdefs.ErrNotImplemented
	}
	var cfg diff.Config
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if tm := epoch.FromContext(ctx); tm != nil && cfg.SourceDateEpoch == nil {
		cfg.SourceDateEpoch = tm
	}
	for _, f := range []string{up.Scratch, up.Container, lo.Container} {
		if f == "" {
			continue
		}
		if why := d.snapshots.InUse(f); why != "" {
			return ocispec.Descriptor{}, fmt.Errorf("container disk %s is in use (%s): stop the container first: %w",
				f, why, errdefs.ErrFailedPrecondition)
		}
	}
	// kiln's own directory (guest pieces, the image config kiln wrote
	// into the container's disk) is not the container's change.
	layer, err := d.layerOf(lo, up, ext4layer.Options{SourceDateEpoch: cfg.SourceDateEpoch, Exclude: []string{guest.Dir}})
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	ctx, err = d.leased(outgoing(ctx))
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc, err := d.writeLayer(ctx, cfg, layer)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	log.G(ctx).WithFields(log.Fields{"digest": desc.Digest, "size": desc.Size}).Debug("compared")
	return desc, nil
}

// layerOf picks how the difference is computed: an overlay-mode
// container's changes are its scratch disk's upper directory, when
// compared with the disk it overlays; anything else is the difference
// between two complete filesystems.
func (d *Differ) layerOf(lo, up Disks, opts ext4layer.Options) (func(ctx context.Context, w io.Writer) error, error) {
	if lo.Scratch != "" || up.Scratch != "" && (lo.Container != "" || lo.Disk != up.Disk) {
		return nil, fmt.Errorf("an overlay-mode container can only be compared with the disk it overlays (its parent): %w",
			errdefs.ErrInvalidArgument)
	}
	if up.Scratch != "" {
		return func(ctx context.Context, w io.Writer) error {
			return withFS(up.Scratch, func(fs *ext4read.FS) error {
				return ext4layer.OverlayUpper(ctx, w, fs, "/"+guest.ScratchUpper, opts)
			})
		}, nil
	}
	lowerFile, upperFile := lo.Disk+lo.Container, up.Disk+up.Container // one of each is set
	return func(ctx context.Context, w io.Writer) error {
		return withFS(upperFile, func(upperFS *ext4read.FS) error {
			if lowerFile == "" {
				return ext4layer.Changes(ctx, w, nil, upperFS, opts)
			}
			return withFS(lowerFile, func(lowerFS *ext4read.FS) error {
				return ext4layer.Changes(ctx, w, lowerFS, upperFS, opts)
			})
		})
	}, nil
}

// withFS opens an ext4 file for reading in userspace.
func withFS(file string, fn func(*ext4read.FS) error) error {
	fs, f, err := ext4read.OpenFile(file, ext4read.Options{})
	if err != nil {
		return err
	}
	defer f.Close()
	return fn(fs)
}

// writeLayer compresses a layer as cfg asks and commits it to the content
// store, as containerd's own differs do: with the uncompressed digest in
// the containerd.io/uncompressed label.
func (d *Differ) writeLayer(ctx context.Context, cfg diff.Config, layer func(context.Context, io.Writer) error) (ocispec.Descriptor, error) {
	ctype := compression.Uncompressed
	if cfg.Compressor != nil {
		if cfg.MediaType == "" {
			return ocispec.Descriptor{}, fmt.Errorf("media type must be explicitly specified when using custom compressor: %w", errdefs.ErrInvalidArgument)
		}
	} else {
		if cfg.MediaType == "" {
			cfg.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		switch cfg.MediaType {
		case ocispec.MediaTypeImageLayer:
		case ocispec.MediaTypeImageLayerGzip:
			ctype = compression.Gzip
		case ocispec.MediaTypeImageLayerZstd:
			ctype = compression.Zstd
		default:
			// The mounts are kiln's: no other differ could do better.
			return ocispec.Descriptor{}, fmt.Errorf("unsupported diff media type: %v: %w", cfg.MediaType, errdefs.ErrInvalidArgument)
		}
	}
	ref, own := cfg.Reference, cfg.Reference == ""
	if own {
		var b [8]byte
		rand.Read(b[:]) //nolint:errcheck // never fails
		ref = "kiln-compare-" + hex.EncodeToString(b[:])
	}
	cw, err := content.OpenWriter(ctx, d.content, content.WithRef(ref), content.WithDescriptor(ocispec.Descriptor{MediaType: cfg.MediaType}))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to open writer: %w", err)
	}
	committed := false
	defer func() {
		if !committed {
			cw.Close()
			if own {
				d.content.Abort(context.WithoutCancel(ctx), ref) //nolint:errcheck // best effort
			}
		}
	}()
	if !own {
		if err := cw.Truncate(0); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	var compressed io.WriteCloser
	switch {
	case cfg.Compressor != nil:
		compressed, err = cfg.Compressor(cw, cfg.MediaType)
	case ctype != compression.Uncompressed:
		compressed, err = compression.CompressStream(cw, ctype)
	default:
		compressed = nopCloser{cw}
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to get compressed stream: %w", err)
	}
	dgstr := digest.SHA256.Digester()
	err = layer(ctx, io.MultiWriter(compressed, dgstr.Hash()))
	if cerr := compressed.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to write diff: %w", err)
	}
	if cfg.Labels == nil {
		cfg.Labels = map[string]string{}
	}
	cfg.Labels[labels.LabelUncompressed] = dgstr.Digest().String()
	dgst := cw.Digest()
	if err := cw.Commit(ctx, 0, dgst, content.WithLabels(cfg.Labels)); err != nil {
		if !errdefs.IsAlreadyExists(err) {
			return ocispec.Descriptor{}, fmt.Errorf("failed to commit: %w", err)
		}
		cw.Close()
	}
	committed = true
	info, err := d.content.Info(ctx, dgst)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to get info from content store: %w", err)
	}
	if info.Labels[labels.LabelUncompressed] == "" {
		// The blob existed without the label.
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		info.Labels[labels.LabelUncompressed] = cfg.Labels[labels.LabelUncompressed]
		if _, err := d.content.Update(ctx, info, "labels."+labels.LabelUncompressed); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("error setting uncompressed label: %w", err)
		}
	}
	return ocispec.Descriptor{MediaType: cfg.MediaType, Size: info.Size, Digest: info.Digest}, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// diffLease is how long a diff kiln writes outside any lease of the
// caller's is kept from garbage collection: long enough for the caller
// to reference it (in an image, or a lease of its own).
const diffLease = 10 * time.Minute

// leased returns ctx with a lease for the diff about to be written. A
// caller's lease does not reach kiln (containerd's diff service does not
// pass it on to a proxy differ), so without one of its own the blob
// could be collected before the caller sees it. The lease expires by
// itself.
func (d *Differ) leased(ctx context.Context) (context.Context, error) {
	if _, ok := leases.FromContext(ctx); ok || d.leases == nil {
		return ctx, nil
	}
	l, err := d.leases.Create(ctx, leases.WithRandomID(), leases.WithExpiration(diffLease))
	if err != nil {
		return nil, fmt.Errorf("creating a lease for the diff: %w", err)
	}
	return leases.WithLease(ctx, l.ID), nil
}
