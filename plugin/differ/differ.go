// Package differ is kiln's containerd differ.
//
// Apply: for extraction mounts of kiln's snapshotter it reads the layer
// blob from containerd's content store, decompresses and verifies it,
// checks every entry's name, and stores the uncompressed tar in the
// snapshot, without mounting anything.
//
// Compare: for kiln's container and view mounts it reads the disks in
// userspace (a container's disk is written by a guest, and the host
// kernel never parses it) and writes the OCI layer of the difference to
// the content store.
//
// For any other mounts it answers NotImplemented, so containerd goes on
// to its next differ.
package differ

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/layer"
)

// Snapshots is what the differ needs of kiln's snapshotter.
type Snapshots interface {
	// Extraction recognises the mounts of one of kiln's extraction
	// snapshots and says where its layer goes.
	Extraction(mounts []mount.Mount) (Extraction, bool)
	// Store keeps the layer of an extraction snapshot: r is its
	// uncompressed tar, diffID gives its digest once r is read to its
	// end. It returns the tar's size.
	Store(ctx context.Context, ext Extraction, r io.Reader, name string, syncFs bool, diffID func() (digest.Digest, error)) (int64, error)
	// Disks recognises mounts of kiln's disks (views and containers), and
	// no mounts at all as an empty filesystem.
	Disks(mounts []mount.Mount) (Disks, bool)
	// InUse says why a container's disk is in use ("" when it is not).
	InUse(file string) string
	// Limits caps what a layer may make kiln do.
	Limits() fstree.Limits
}

// Extraction is an extraction snapshot the layer is stored in.
type Extraction struct {
	// Dir is the snapshot's directory.
	Dir string
}

// Disks is what a set of kiln's mounts shows, in files: a read-only
// disk, an overlay-mode container's scratch over it, or a copy-mode
// container's disk.
type Disks struct {
	Disk, Scratch, Container string
}

// Differ implements diff.Applier and diff.Comparer.
type Differ struct {
	snapshots Snapshots
	content   content.Store
	stream    BlobStream
	leases    leases.Manager
	observe   func(d time.Duration, bytes int64, err error)
}

// New returns a differ reading and writing blobs in content (containerd's
// content store, reached through its API), reading layers with stream,
// and protecting what it writes with leases from lm. observe, if set, is
// told how each apply went.
func New(sn Snapshots, cs content.Store, stream BlobStream, lm leases.Manager, observe func(d time.Duration, bytes int64, err error)) *Differ {
	return &Differ{snapshots: sn, content: cs, stream: stream, leases: lm, observe: observe}
}

// outgoing passes the namespace and the lease of the request kiln serves
// on to containerd: the content the differ reads and writes is the
// namespace's, and what it writes belongs to the caller's lease (as with
// containerd's own differs), so that garbage collection does not remove
// a diff before the caller has referenced it.
func outgoing(ctx context.Context) context.Context {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	if l, ok := leases.FromContext(ctx); ok {
		ctx = leases.WithLease(ctx, l)
	}
	return ctx
}

// Apply stores a layer in a kiln extraction snapshot.
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (_ ocispec.Descriptor, err error) {
	ext, ok := d.snapshots.Extraction(mounts)
	if !ok {
		return ocispec.Descriptor{}, errdefs.ErrNotImplemented
	}
	var cfg diff.ApplyConfig
	for _, o := range opts {
		if err := o(ctx, desc, &cfg); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if len(cfg.ProcessorPayloads) > 0 || layer.CheckMediaType(desc.MediaType) != nil {
		// Stream processors (e.g. encrypted layers) and unknown media
		// types are containerd's walking differ's job; it can write
		// into kiln's extraction snapshots too.
		return ocispec.Descriptor{}, errdefs.ErrNotImplemented
	}
	start := time.Now()
	var size int64
	defer func() {
		if d.observe != nil {
			d.observe(time.Since(start), size, err)
		}
	}()
	applied, err := d.store(outgoing(ctx), desc, ext, cfg.SyncFs)
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", desc.Digest).Error("apply failed")
		return ocispec.Descriptor{}, err
	}
	size = applied.Size
	log.G(ctx).WithFields(log.Fields{
		"layer": desc.Digest, "diffID": applied.Digest, "duration": time.Since(start),
	}).Debug("layer stored")
	return applied, nil
}

func (d *Differ) store(ctx context.Context, desc ocispec.Descriptor, ext Extraction, syncFs bool) (_ ocispec.Descriptor, err error) {
	blob, err := d.stream(ctx, desc)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s: reading blob from the content store: %w", desc.Digest, err)
	}
	// containerd checked the blob's digest as it took it in (and keeps
	// it under that digest); its unpacker checks the diffID kiln returns
	// against the image's config.
	lr, err := layer.NewReader(blob, layer.Descriptor{MediaType: desc.MediaType, Digest: desc.Digest, Verified: true})
	if err != nil {
		blob.Close()
		return ocispec.Descriptor{}, err
	}
	defer func() {
		blob.Close() // first: it unblocks a read the decompressor waits on
		lr.Close()
	}()

	size, err := d.snapshots.Store(ctx, ext, lr, desc.Digest.String(), syncFs, func() (digest.Digest, error) {
		if err := lr.Finish(); err != nil {
			return "", err
		}
		return lr.DiffID(), nil
	})
	if err != nil {
		return ocispec.Descriptor{}, layer.Cause(err, lr)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: lr.DiffID(), Size: size}, nil
}
