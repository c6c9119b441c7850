// Package differ is kiln's containerd differ. For extraction mounts of
// kiln's snapshotter it reads the layer blob from containerd's content
// store, decompresses and verifies it, checks every entry's name, and
// stores the uncompressed tar in the snapshot, without mounting anything.
// For any other mount it answers NotImplemented, so containerd goes on to
// its next differ.
package differ

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/fstree"
)

// Snapshots tells the differ which mounts are kiln's extraction snapshots.
type Snapshots interface {
	SnapshotDir(m mount.Mount) (dir string, ok bool)
}

// LayerSink takes the layer's tar as it is stored, to replay it ahead of
// the build; Done says whether the layer was stored. storedAt is where
// the tar will be, byte for byte, once stored.
type LayerSink interface {
	Apply(ctx context.Context, r io.Reader, name, storedAt string) error
	Done(ok bool)
}

// Differ implements diff.Applier (and diff.Comparer, which it leaves to
// containerd's walking differ).
type Differ struct {
	snapshots Snapshots
	content   content.Provider
	layerFile func(dir string) (tarPath, diffIDPath string)
	// Stage, if set, gives a sink for a snapshot's layer (or nil).
	Stage func(ctx context.Context, dir string) LayerSink
	// Observe, if set, is told how each apply went.
	Observe func(d time.Duration, bytes int64, err error)
}

// New returns a differ reading blobs from content (containerd's content
// store, reached through its API) and storing layers where layerFile says.
func New(sn Snapshots, cs content.Provider, layerFile func(dir string) (string, string)) *Differ {
	return &Differ{snapshots: sn, content: cs, layerFile: layerFile}
}

// Apply stores a layer in a kiln extraction snapshot.
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (_ ocispec.Descriptor, err error) {
	if len(mounts) != 1 {
		return ocispec.Descriptor{}, errdefs.ErrNotImplemented
	}
	dir, ok := d.snapshots.SnapshotDir(mounts[0])
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
		if d.Observe != nil {
			d.Observe(time.Since(start), size, err)
		}
	}()
	applied, err := d.store(ctx, desc, dir, cfg.SyncFs)
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

func (d *Differ) store(ctx context.Context, desc ocispec.Descriptor, dir string, syncFs bool) (ocispec.Descriptor, error) {
	ra, err := d.content.ReaderAt(ctx, desc)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s: reading blob from the content store: %w", desc.Digest, err)
	}
	lr, err := layer.NewReader(content.NewReader(ra), layer.Descriptor{MediaType: desc.MediaType, Digest: desc.Digest})
	if err != nil {
		ra.Close()
		return ocispec.Descriptor{}, err
	}
	defer func() {
		ra.Close() // first: it unblocks a read the decompressor waits on
		lr.Close()
	}()

	tarPath, diffIDPath := d.layerFile(dir)
	tmp := tarPath + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	counter := &countingWriter{w: w}
	var sink LayerSink
	if d.Stage != nil {
		sink = d.Stage(ctx, dir)
	}
	if sink != nil {
		// The replay checks every entry too, against the layers below.
		err = sink.Apply(ctx, io.TeeReader(lr, counter), desc.Digest.String(), tarPath)
		defer func() { sink.Done(ok) }()
	} else {
		err = fstree.Check(ctx, io.TeeReader(lr, counter), desc.Digest.String())
	}
	if err != nil {
		return ocispec.Descriptor{}, layer.Cause(err, lr)
	}
	// The tar reader stops at the end marker; the rest (padding) is part
	// of the layer and of its digest.
	if _, err := io.Copy(counter, lr); err != nil {
		return ocispec.Descriptor{}, layer.Cause(err, lr)
	}
	if err := w.Flush(); err != nil {
		return ocispec.Descriptor{}, err
	}
	if syncFs {
		if err := f.Sync(); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if err := f.Close(); err != nil {
		return ocispec.Descriptor{}, err
	}
	diffID := lr.DiffID()
	if err := os.WriteFile(diffIDPath, []byte(diffID.String()+"\n"), 0o600); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := os.Rename(tmp, tarPath); err != nil {
		return ocispec.Descriptor{}, err
	}
	ok = true
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: diffID, Size: counter.n}, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Compare is not kiln's job: containerd's walking differ computes diffs.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, errdefs.ErrNotImplemented
}
