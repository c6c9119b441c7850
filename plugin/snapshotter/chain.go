package snapshotter

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/dirtar"
	"github.com/kilnfs/kiln/internal/ext4layer"
	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/layer"
)

// chainLayers is what a committed snapshot's filesystem is made of.
type chainLayers struct {
	// layers are replayed in order, bottom first.
	layers []build.Layer
	// chainID names the build: the image's chain ID, like kiln convert,
	// when every layer's diffID is known, so both give the same bytes;
	// one made from the snapshot IDs otherwise.
	chainID digest.Digest
	// image is the image whose top layer the snapshot is, when
	// containerd said so and chainID is the image's (see sourceOf).
	image imageSource
}

// chainReader reads chains from the metadata store and the snapshot
// directories.
type chainReader struct {
	ms   *storage.MetaStore
	root string
	// registries says how the registries of lazily loaded layers are
	// reached, and stall how long one may send nothing.
	registries image.Options
	stall      time.Duration
}

func (c chainReader) dir(id string) string { return filepath.Join(c.root, snapshotsDir, id) }

// ids returns the ids of a committed snapshot and its ancestors, the
// snapshot first, and the snapshot's labels.
func (c chainReader) ids(ctx context.Context, id string) ([]string, map[string]string, error) {
	var (
		chain  []string
		labels map[string]string
	)
	err := c.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		key, ok := ids[id]
		if !ok {
			return fmt.Errorf("snapshot %s: %w", id, errdefs.ErrNotFound)
		}
		// Committed snapshots are found by name; each names its parent.
		for key != "" {
			sid, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			if chain == nil {
				labels = info.Labels
			}
			chain = append(chain, sid)
			key = info.Parent
		}
		return nil
	})
	return chain, labels, err
}

func (c chainReader) chainLayers(ctx context.Context, id string) (chainLayers, error) {
	chain, labels, err := c.ids(ctx, id)
	if err != nil {
		return chainLayers{}, err
	}
	var (
		layers  []build.Layer
		diffIDs []digest.Digest
		ids     []string
		byID    = true
	)
	for i := len(chain) - 1; i >= 0; i-- {
		dir := c.dir(chain[i])
		ids = append(ids, chain[i])
		tarPath, diffIDPath := filepath.Join(dir, layerTar), filepath.Join(dir, diffIDFile)
		switch dirKind(dir) {
		case kindCopy:
			// A committed copy-mode container: its disk is the whole
			// filesystem, read in userspace (it is the guest's).
			layers, diffIDs, byID = []build.Layer{ext4Layer(filepath.Join(dir, containerFile), fullTree)}, nil, false
		case kindOverlay:
			// A committed overlay-mode container: its scratch's upper
			// directory is the change on its parent.
			layers = append(layers, ext4Layer(filepath.Join(dir, scratchFile), overlayUpper))
			byID = false
		case kindLayer:
			if rec, ok, err := readLazy(dir); err != nil || ok {
				if err != nil {
					return chainLayers{}, fmt.Errorf("snapshot %s: %w", chain[i], err)
				}
				diffIDs = append(diffIDs, rec.DiffID)
				layers = append(layers, lazyLayerBlob(ctx, c.registries, c.stall, rec))
				continue
			}
			if exists(filepath.Join(dir, layerRecord)) {
				d, err := readDiffID(diffIDPath)
				if err != nil {
					return chainLayers{}, fmt.Errorf("snapshot %s: %w", chain[i], err)
				}
				if mark := filepath.Join(dir, dataUnsyncedFile); exists(mark) && unsyncedEarlierBoot(mark) {
					return chainLayers{}, fmt.Errorf("snapshot %s: its stored layer did not reach stable storage before the machine stopped: "+
						"remove the images with this layer and pull them again: %w", chain[i], errdefs.ErrDataLoss)
				}
				if !slices.ContainsFunc(dataPaths(dir), exists) {
					return chainLayers{}, fmt.Errorf("snapshot %s: its stored layer's data is missing: "+
						"remove the images with this layer and pull them again: %w", chain[i], errdefs.ErrDataLoss)
				}
				diffIDs = append(diffIDs, d)
				layers = append(layers, build.Layer{
					Descriptor: descriptor(d), Size: -1,
					Record: filepath.Join(dir, layerRecord), Data: dataPaths(dir),
				})
				continue
			}
			if !exists(tarPath) && exists(diffIDPath) {
				// kiln's differ stored it, and it is gone (a crash
				// before it reached the disk): the disk would lack it.
				return chainLayers{}, fmt.Errorf("snapshot %s: its stored layer is missing: "+
					"remove the images with this layer and pull them again: %w", chain[i], errdefs.ErrDataLoss)
			}
			if !exists(tarPath) {
				// Filled by containerd's walking differ.
				upper := filepath.Join(dir, upperDir)
				layers = append(layers, build.Layer{
					Descriptor: descriptor(""),
					Size:       -1,
					Open:       func() (io.ReadCloser, error) { return dirReader(upper, dirtar.Options{Overlay: true}), nil },
				})
				byID = false
				continue
			}
			d, err := readDiffID(diffIDPath)
			if err != nil {
				return chainLayers{}, fmt.Errorf("snapshot %s: %w", chain[i], err)
			}
			diffIDs = append(diffIDs, d)
			layers = append(layers, build.Layer{
				Descriptor: descriptor(d),
				Size:       fileSize(tarPath),
				Open:       func() (io.ReadCloser, error) { return os.Open(tarPath) },
				Stored:     tarPath,
			})
		default:
			return chainLayers{}, fmt.Errorf("snapshot %s has no filesystem", chain[i])
		}
	}
	if byID {
		src, _ := sourceOf(labels)
		return chainLayers{layers: layers, chainID: identity.ChainID(diffIDs), image: src}, nil
	}
	return chainLayers{layers: layers, chainID: digest.FromString("kiln-snapshots:" + strings.Join(ids, ","))}, nil
}

func readDiffID(p string) (digest.Digest, error) {
	raw, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	return digest.Parse(strings.TrimSpace(string(raw)))
}

func descriptor(diffID digest.Digest) layer.Descriptor {
	return layer.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: diffID, DiffID: diffID}
}

// dirReader streams a directory tree as a tar.
func dirReader(dir string, opts dirtar.Options) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(dirtar.Write(pw, dir, opts)) }()
	return pr
}

// A containerDiff writes what a container's ext4 holds as a layer tar.
type containerDiff func(ctx context.Context, w io.Writer, fs *ext4read.FS) error

// kiln's own directory is left out of what a container wrote: it holds
// the guest pieces and the image config kiln put there, which a disk
// built on the container gets afresh.
var containerLayer = ext4layer.Options{Exclude: []string{guest.Dir}}

func fullTree(ctx context.Context, w io.Writer, fs *ext4read.FS) error {
	return ext4layer.Full(ctx, w, fs, fs.Root(), containerLayer)
}

func overlayUpper(ctx context.Context, w io.Writer, fs *ext4read.FS) error {
	return ext4layer.OverlayUpper(ctx, w, fs, "/"+guest.ScratchUpper, containerLayer)
}

// ext4Layer streams what a container's ext4 file holds as a layer, read
// in userspace: the file was written by a guest, and the host kernel
// never parses it.
func ext4Layer(file string, diff containerDiff) build.Layer {
	return build.Layer{
		Descriptor: descriptor(""),
		Size:       -1,
		Open: func() (io.ReadCloser, error) {
			fs, f, err := ext4read.OpenFile(file, ext4read.Options{})
			if err != nil {
				return nil, err
			}
			pr, pw := io.Pipe()
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				pw.CloseWithError(diff(ctx, pw, fs))
				f.Close()
			}()
			return &cancelOnClose{ReadCloser: pr, cancel: cancel}, nil
		},
	}
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	c.cancel()
	return c.ReadCloser.Close()
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return -1
	}
	return fi.Size()
}
