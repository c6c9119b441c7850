// Package build turns an image's layers into its ext4 root filesystem:
// it replays the layers into a merged tree (internal/fstree) and writes
// the tree with e2fsprogs (internal/ext4). The standalone converter and
// the containerd snapshotter both build through here, so the same chain of
// layers with the same options gives the same bytes either way.
package build

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/progress"
)

// Epoch is the time kiln gives to what no layer dates: directories that
// layers leave implicit, the root when no layer describes it, and the
// filesystem's own timestamps.
var Epoch = time.Unix(0, 0).UTC()

// formatVersion changes whenever the same input would build different
// bytes, so that caches keyed by Key never serve an older layout.
const formatVersion = "kiln-rootfs-3"

// Layer is one layer to replay.
type Layer struct {
	layer.Descriptor
	// Size is the blob size, for progress; -1 if unknown.
	Size int64
	// Open returns the blob as stored (compressed or not).
	Open func() (io.ReadCloser, error)
	// Stored, if set, is a file holding the layer's uncompressed tar:
	// file contents are copied into the image from there.
	Stored string
}

// Options are the choices for a build. All but NoSync change the bytes
// and so go into Key.
type Options struct {
	// Size is the filesystem size in bytes; 0 sizes it automatically.
	Size int64
	// Inject adds guest pieces or a user bundle after the layers.
	Inject *inject.Set
	// NoSync returns before the file contents reach the disk (see
	// ext4.Options); it does not change the bytes.
	NoSync bool
}

// Key identifies what Rootfs builds from a chain of layers with these
// options. It names the cached file and seeds the filesystem UUID.
func Key(chainID digest.Digest, opts Options) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00chain=%s\x00size=%s\x00", formatVersion, chainID, strconv.FormatInt(opts.Size, 10))
	if fp := opts.Inject.Fingerprint(); fp != "" {
		fmt.Fprintf(h, "inject=%s\x00", fp)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Result describes a built image and where the time went.
type Result struct {
	ext4.Result
	Unpack time.Duration // replaying layers into the staging tree
	Build  time.Duration // writing the ext4 (e2fsprogs and the contents)
}

// Rootfs replays layers in order into a staging tree under workDir and
// writes the ext4 image to out. key is what Key returned for the chain.
func Rootfs(ctx context.Context, layers []Layer, out, workDir, key string, opts Options, rep progress.Reporter) (Result, error) {
	if rep == nil {
		rep = progress.Discard
	}
	start := time.Now()
	tree, err := NewTree(workDir)
	if err != nil {
		return Result{}, err
	}
	var total int64
	for _, l := range layers {
		total += max(l.Size, 0)
	}
	unpack := rep.Bar("unpack", total, true)
	for _, l := range layers {
		if err := applyLayer(ctx, tree, l, unpack); err != nil {
			return Result{}, err
		}
	}
	unpack.Done()
	res, err := FromTree(ctx, tree, out, workDir, key, opts, rep)
	res.Unpack = time.Since(start) - res.Build
	return res, err
}

// NewTree starts an empty merged tree staged in workDir.
func NewTree(workDir string) (*fstree.Tree, error) {
	stage := filepath.Join(workDir, "stage")
	if err := os.Mkdir(stage, 0o700); err != nil {
		return nil, err
	}
	return fstree.New(stage, filepath.Join(workDir, "stage.data"), Epoch)
}

// FromTree writes a tree that holds all of an image's layers as an ext4
// image: injection first, then the filesystem. It changes the tree.
func FromTree(ctx context.Context, tree *fstree.Tree, out, workDir, key string, opts Options, rep progress.Reporter) (Result, error) {
	if rep == nil {
		rep = progress.Discard
	}
	start := time.Now()
	if err := opts.Inject.Apply(ctx, tree); err != nil {
		return Result{}, err
	}
	mid := time.Now()
	bar := rep.Bar("build", 1, false)
	res, err := ext4.Build(ctx, tree, out, ext4.Options{Size: opts.Size, Identity: key, WorkDir: workDir, NoSync: opts.NoSync})
	if err != nil {
		return Result{}, err
	}
	bar.Add(1)
	bar.Done()
	return Result{Result: res, Unpack: mid.Sub(start), Build: time.Since(mid)}, nil
}

func applyLayer(ctx context.Context, tree *fstree.Tree, l Layer, bar progress.Bar) error {
	blob, err := l.Open()
	if err != nil {
		var lerr *layer.Error
		if errors.As(err, &lerr) {
			return lerr
		}
		return &layer.Error{Digest: l.Digest, Err: fmt.Errorf("opening blob: %w", err)}
	}
	lr, err := layer.NewReader(progress.Reader(blob, bar), l.Descriptor)
	if err != nil {
		blob.Close()
		return err
	}
	defer func() {
		blob.Close() // first: it unblocks a read the decompressor waits on
		lr.Close()
	}()
	if l.Stored != "" {
		err = tree.ApplyStored(ctx, lr, l.Digest.String(), l.Stored)
	} else {
		err = tree.Apply(ctx, lr, l.Digest.String())
	}
	if err != nil {
		return layer.Cause(err, lr)
	}
	return lr.Finish()
}
