// Package build turns an image's layers into its ext4 root filesystem:
// it replays the layers into a merged tree (internal/fstree) and writes
// the tree with one of the ext4 writers, kiln's own (internal/ext4write,
// the default) or e2fsprogs (internal/ext4, the reference). The
// standalone converter and the containerd snapshotter both build through
// here, so the same chain of layers with the same options gives the same
// bytes either way.
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
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/ext4write"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/layer"
	"github.com/kilnfs/kiln/internal/progress"
	"github.com/kilnfs/kiln/internal/verity"
)

// Epoch is the time kiln gives to what no layer dates: directories that
// layers leave implicit, the root when no layer describes it, and the
// filesystem's own timestamps.
var Epoch = time.Unix(0, 0).UTC()

// formatVersion changes whenever the same input would build different
// bytes, so that caches keyed by Key never serve an older layout.
const formatVersion = "kiln-rootfs-6"

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
	// Record, if set, is the record of a layer kept by
	// fstree.StoreLayer, whose data file is the first of Data that
	// exists; Open is not used.
	Record string
	Data   []string
}

// Options are the choices for a build. All but NoSync and Limits change the bytes
// and so go into Key.
type Options struct {
	// Size is the filesystem size in bytes; 0 sizes it automatically.
	Size int64
	// Inject adds guest pieces or a user bundle after the layers.
	Inject *inject.Set
	// Writer lays out the ext4; nil is DefaultWriter.
	Writer Writer
	// NoSync returns before the file contents reach the disk (see
	// ext4.Options); it does not change the bytes.
	NoSync bool
	// Limits caps what the layers may make kiln do; an image past one
	// is not built at all, so they do not change the bytes either.
	Limits fstree.Limits
	// Verity appends a dm-verity hash tree after the filesystem (see
	// internal/verity); the filesystem's size stays the same.
	Verity bool
}

func (o Options) writer() Writer {
	if o.Writer == nil {
		return DefaultWriter
	}
	return o.Writer
}

// Writer lays out a merged tree as an ext4 image.
type Writer interface {
	// Name is how configuration and flags choose the writer.
	Name() string
	// Staged says whether the writer reads the tree's names from a
	// staging directory on the host (see fstree.New).
	Staged() bool
	Write(ctx context.Context, tree *fstree.Tree, out string, opts ext4.Options) (ext4.Result, error)
}

// The writers: kiln's own, one pass in Go, and e2fsprogs, the reference
// it is checked against.
var (
	DefaultWriter Writer = ext4write.Writer{}
	writers              = []Writer{ext4write.Writer{}, ext4.E2fsprogs{}}
)

// WriterNamed returns the writer with a name; "" is the default.
func WriterNamed(name string) (Writer, error) {
	if name == "" {
		return DefaultWriter, nil
	}
	for _, w := range writers {
		if w.Name() == name {
			return w, nil
		}
	}
	return nil, fmt.Errorf("unknown ext4 writer %q (one of %s)", name, strings.Join(WriterNames(), ", "))
}

// WriterNames lists the writers' names, the default first.
func WriterNames() []string {
	var names []string
	for _, w := range writers {
		names = append(names, w.Name())
	}
	return names
}

// Key identifies what a build makes from a chain of layers with these
// options. It names the cached file and seeds the filesystem UUID.
func Key(chainID digest.Digest, opts Options) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00chain=%s\x00size=%s\x00writer=%s\x00", formatVersion, chainID, strconv.FormatInt(opts.Size, 10), opts.writer().Name())
	if fp := opts.Inject.Fingerprint(); fp != "" {
		fmt.Fprintf(h, "inject=%s\x00", fp)
	}
	// Only when set, so that the keys of builds without it stay those of
	// earlier kilns.
	if opts.Verity {
		fmt.Fprintf(h, "verity=%s\x00", verity.Algorithm)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Identity is what decides the bytes of a build, as kiln publishes it
// beside an image for other machines to use instead of building.
type Identity struct {
	Format  string        // the layout's version (formatVersion)
	Key     string        // Key(ChainID, options)
	ChainID digest.Digest // the layers
	Size    int64         // the requested size, 0 for automatic
	Writer  string        // the ext4 writer's name
	Inject  string        // the injected pieces' fingerprint, "" for none
	Verity  bool          // a dm-verity hash tree follows the filesystem
}

// IdentityOf describes the build of chainID with opts.
func IdentityOf(chainID digest.Digest, opts Options) Identity {
	return Identity{
		Format: formatVersion, Key: Key(chainID, opts), ChainID: chainID,
		Size: opts.Size, Writer: opts.writer().Name(), Inject: opts.Inject.Fingerprint(), Verity: opts.Verity,
	}
}

// Request is one build: an image's layers, the chain ID they make, where
// the image goes and how it is built.
type Request struct {
	ChainID digest.Digest
	Layers  []Layer
	Out     string // the image file, which must not exist
	WorkDir string // the build's temporary files
	Options Options
	// TakeTop lets the writer make the top layer's data file (a layer
	// with a Record) the image: the layer's contents are then not
	// copied, and stay readable at the same places in the image.
	TakeTop bool
}

// Key is the request's Key.
func (r Request) Key() string { return Key(r.ChainID, r.Options) }

// Result describes a built image and where the time went.
type Result struct {
	ext4.Result
	Unpack time.Duration // replaying layers into the tree
	Build  time.Duration // writing the ext4 (and its verity tree)
	// Verity describes the disk's hash tree when Options.Verity is set.
	Verity *verity.Info
}

// Rootfs replays the request's layers in order into a tree and writes
// the ext4 image.
func Rootfs(ctx context.Context, req Request, rep progress.Reporter) (Result, error) {
	if rep == nil {
		rep = progress.Discard
	}
	start := time.Now()
	tree, err := NewTree(req.WorkDir, req.Options)
	if err != nil {
		return Result{}, err
	}
	var total int64
	for _, l := range req.Layers {
		total += max(l.Size, 0)
	}
	unpack := rep.Bar("unpack", total, true)
	for _, l := range req.Layers {
		if err := applyLayer(ctx, tree, l, unpack); err != nil {
			return Result{}, err
		}
	}
	unpack.Done()
	// The tree is this build's own: the writer may make its data file
	// the image.
	res, err := fromTree(ctx, tree, req, rep, true)
	res.Unpack = time.Since(start) - res.Build
	return res, err
}

// NewTree starts an empty merged tree in workDir, staged on the host if
// the options' writer needs it.
func NewTree(workDir string, opts Options) (*fstree.Tree, error) {
	stage := ""
	if opts.writer().Staged() {
		stage = filepath.Join(workDir, "stage")
		if err := os.Mkdir(stage, 0o700); err != nil {
			return nil, err
		}
	}
	tree, err := fstree.New(stage, filepath.Join(workDir, "stage.data"), Epoch)
	if err != nil {
		return nil, err
	}
	tree.SetLimits(opts.Limits)
	return tree, nil
}

// FromTree writes a tree that holds all of an image's layers (made by
// NewTree with the same options; req.Layers is not used) as an ext4
// image: injection first, then the filesystem. It changes the tree.
func FromTree(ctx context.Context, tree *fstree.Tree, req Request, rep progress.Reporter) (Result, error) {
	return fromTree(ctx, tree, req, rep, false)
}

func fromTree(ctx context.Context, tree *fstree.Tree, req Request, rep progress.Reporter, own bool) (Result, error) {
	if rep == nil {
		rep = progress.Discard
	}
	start := time.Now()
	opts := req.Options
	if err := opts.Inject.Apply(ctx, tree); err != nil {
		return Result{}, err
	}
	mid := time.Now()
	bar := rep.Bar("build", 1, false)
	take, keeps := "", false
	if n := len(req.Layers); req.TakeTop && n > 0 && req.Layers[n-1].Record != "" {
		// The layers above it read its contents from the file.
		take, keeps = req.Layers[n-1].Data[0], true
	} else if own {
		take = tree.DataFiles()[0]
	}
	res, err := opts.writer().Write(ctx, tree, req.Out, ext4.Options{
		Size: opts.Size, Identity: req.Key(), WorkDir: req.WorkDir, NoSync: opts.NoSync, Take: take, TakeKeeps: keeps,
	})
	if err != nil {
		return Result{}, err
	}
	out := Result{Result: res}
	if opts.Verity {
		v, err := verity.Append(req.Out, req.Key(), !opts.NoSync)
		if err != nil {
			return Result{}, err
		}
		out.Verity = &v
	}
	bar.Add(1)
	bar.Done()
	out.Unpack, out.Build = mid.Sub(start), time.Since(mid)
	return out, nil
}

func applyLayer(ctx context.Context, tree *fstree.Tree, l Layer, bar progress.Bar) error {
	if l.Record != "" {
		f, err := os.Open(l.Record)
		if err != nil {
			return &layer.Error{Digest: l.Digest, Err: fmt.Errorf("opening its record: %w", err)}
		}
		defer f.Close()
		return tree.ApplyStoredLayer(ctx, f, l.Digest.String(), l.Data...)
	}
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
