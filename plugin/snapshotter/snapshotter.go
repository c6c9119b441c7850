// Package snapshotter is kiln's containerd snapshotter: image layers are
// stored as they arrive (a verified layer tar per snapshot, written by
// kiln's differ), each image's rootfs is one ext4 file built once per chain
// from those layers, and containers get a writable ext4 file of their own.
//
// Snapshot directories hold one of:
//
//	layer, fs/, work/   an extraction snapshot: "layer" marks it as kiln's,
//	                    fs/ is the overlay upper directory that containerd's
//	                    walking differ fills if it is used instead of kiln's
//	layer.tar, diffid   the layer as kiln's differ stored it
//	image.ext4          the rootfs built for a committed layer's chain
//	rootfs.ext4         a container's writable filesystem (or a committed one)
//
// Every metadata change happens in a storage.MetaStore transaction; work
// that must not be undone (deleting files) happens after it commits, and
// long work (building an image) happens outside any transaction.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Files and directories of a snapshot.
const (
	layerMarker   = "layer"
	namespaceFile = "namespace"
	upperDir      = "fs"
	workDir       = "work"
	layerTar      = "layer.tar"
	diffIDFile    = "diffid"
	imageFile     = "image.ext4"
	unsyncedFile  = "image.unsynced"
	rootfsFile    = "rootfs.ext4"
	loopFile      = "loop"
)

// Config configures a Snapshotter.
type Config struct {
	// Root holds kiln's state.
	Root string
	// BlockDevices makes Mounts attach loop devices and return them, for
	// shims that accept only block devices.
	BlockDevices bool
	// DefaultSize is the size of a writable snapshot without a parent
	// (bytes; 0: 1 GiB).
	DefaultSize int64
	// Build are the options images are built with.
	Build build.Options
	// Inject adds guest pieces or a bundle to every image built.
	Inject inject.Options
	// ImageConfig finds the config of the image whose layers make a chain,
	// in a namespace: the init piece writes it into the rootfs.
	ImageConfig func(ctx context.Context, namespace string, chainID digest.Digest) ([]byte, error)
	// EagerBuild builds an image's rootfs as soon as its top layer is
	// committed, instead of at the first container, view or export.
	EagerBuild bool
	// ObserveBuild, if set, is told how each image build went.
	ObserveBuild func(d time.Duration, err error)
}

// Snapshotter implements snapshots.Snapshotter (and snapshots.Cleaner).
type Snapshotter struct {
	cfg    Config
	root   string
	ms     *storage.MetaStore
	images *imageBuilder
	loops  *loops
	staged stagedTrees
}

var _ snapshots.Cleaner = (*Snapshotter)(nil)

// New opens (or creates) the snapshotter state under cfg.Root.
func New(ctx context.Context, cfg Config) (*Snapshotter, error) {
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = 1 << 30
	}
	root := cfg.Root
	for _, d := range []string{"snapshots", "tmp", "empty"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, err
		}
	}
	// The empty lower directory of extraction mounts must be searchable.
	if err := os.Chmod(filepath.Join(root, "empty"), 0o755); err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, err
	}
	s := &Snapshotter{cfg: cfg, root: root, ms: ms, loops: &loops{}}
	s.images = newImageBuilder(s)
	if cfg.BlockDevices {
		s.loops.detachStale(ctx, root)
	}
	workdir.RemoveStale(filepath.Join(root, "tmp"))
	s.images.settleUnsynced(ctx)
	return s, nil
}

func (s *Snapshotter) dir(id string) string { return filepath.Join(s.root, "snapshots", id) }

// Stat returns the info of a snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update changes a snapshot's labels.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		info, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return info, err
}

// Walk calls fn for the snapshots that match the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Usage reports the disk a snapshot uses itself (its parents excluded).
func (s *Snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	var id string
	var info snapshots.Info
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return usage, err
	}
	if info.Kind == snapshots.KindActive {
		return diskUsage(s.dir(id))
	}
	return usage, nil
}

// diskUsage counts the blocks and inodes under dir.
func diskUsage(dir string) (snapshots.Usage, error) {
	var u snapshots.Usage
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
			u.Size += st.Blocks * 512
		}
		u.Inodes++
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	return u, err
}

// Prepare creates an active snapshot. An extraction gets a layer directory
// for a differ to fill; anything else is a container and gets a writable
// ext4 file.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var info snapshots.Info
	for _, o := range opts {
		if err := o(&info); err != nil {
			return nil, err
		}
	}
	if isExtraction(key, info.Labels) {
		if parent != "" {
			// The chain goes on: the parent is not an image's top.
			s.images.cancelEager(ctx, parent)
		}
		return s.create(ctx, snapshots.KindActive, key, parent, opts, s.prepareLayer)
	}
	base, err := s.parentImage(ctx, parent)
	if err != nil {
		return nil, err
	}
	size := s.cfg.DefaultSize
	if v := info.Labels[snapshots.LabelSnapshotMaxSize]; v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("label %s=%q: %w", snapshots.LabelSnapshotMaxSize, v, errdefs.ErrInvalidArgument)
		}
		size = n
	} else if base != "" {
		size = 0 // the image's own size
	}
	return s.create(ctx, snapshots.KindActive, key, parent, opts, func(ctx context.Context, dir string) error {
		return s.prepareContainer(ctx, dir, base, size)
	})
}

// isExtraction says whether a snapshot being prepared is for unpacking a
// layer. containerd's unpacker (pulls through the transfer service, or
// with the client's WithPullUnpack) labels it with the chain it unpacks;
// the client's Image.Unpack (ctr image pull --local) does not, but both
// name it with containerd's unpack key format, "extract-<unique> <chain>",
// which reaches kiln behind containerd's "<namespace>/<n>/" prefix.
func isExtraction(key string, labels map[string]string) bool {
	if labels[snapshots.LabelSnapshotRef] != "" {
		return true
	}
	if ns, rest, ok := strings.Cut(key, "/"); ok && ns != "" {
		if n, k, ok := strings.Cut(rest, "/"); ok && n != "" && strings.Trim(n, "0123456789") == "" {
			key = k
		}
	}
	return strings.HasPrefix(key, snapshots.UnpackKeyPrefix+"-")
}

// View creates a read-only snapshot of a committed one: the image's ext4
// itself, shared.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if _, err := s.parentImage(ctx, parent); err != nil {
		return nil, err
	}
	return s.create(ctx, snapshots.KindView, key, parent, opts, func(context.Context, string) error { return nil })
}

// parentImage returns the ext4 holding a committed parent's filesystem,
// building it if needed ("" for no parent). It runs before the snapshot's
// transaction: a build can take seconds and must not hold the database.
func (s *Snapshotter) parentImage(ctx context.Context, parent string) (string, error) {
	if parent == "" {
		return "", nil
	}
	var id string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		pid, info, _, err := storage.GetInfo(ctx, parent)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindCommitted {
			return fmt.Errorf("parent %q is not committed: %w", parent, errdefs.ErrInvalidArgument)
		}
		id = pid
		return nil
	})
	if err != nil {
		return "", err
	}
	return s.images.get(ctx, id)
}

// create records a snapshot and makes its directory with fill; both are
// undone if either fails.
func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt,
	fill func(ctx context.Context, dir string) error) ([]mount.Mount, error) {
	var snap storage.Snapshot
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		dir := s.dir(snap.ID)
		if err := os.Mkdir(dir, 0o700); err != nil {
			return err
		}
		if err := fill(ctx, dir); err != nil {
			os.RemoveAll(dir)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s.mounts(ctx, snap)
}

func (s *Snapshotter) prepareLayer(ctx context.Context, dir string) error {
	for _, d := range []string{upperDir, workDir} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	// The namespace is where the image's config is found later, for
	// injecting init.
	ns, _ := namespaces.Namespace(ctx)
	if err := os.WriteFile(filepath.Join(dir, namespaceFile), []byte(ns), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, layerMarker), nil, 0o600)
}

// Mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var snap storage.Snapshot
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, err
	}
	return s.mounts(ctx, snap)
}

func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot) ([]mount.Mount, error) {
	dir := s.dir(snap.ID)
	if snap.Kind == snapshots.KindActive {
		if _, err := os.Stat(filepath.Join(dir, layerMarker)); err == nil {
			// Extraction: containerd's walking differ writes straight
			// into the upper directory (converting whiteouts the
			// overlayfs way); kiln's differ recognises the marker.
			return []mount.Mount{{
				Type:   "overlay",
				Source: "overlay",
				Options: []string{
					"workdir=" + filepath.Join(dir, workDir),
					"upperdir=" + filepath.Join(dir, upperDir),
					"lowerdir=" + s.lowerDirs(snap.ParentIDs),
				},
			}}, nil
		}
		return s.ext4Mount(ctx, dir, filepath.Join(dir, rootfsFile), false)
	}
	// A view: the parent's image, read-only.
	var file string
	if len(snap.ParentIDs) == 0 {
		f, err := s.images.empty(ctx)
		if err != nil {
			return nil, err
		}
		file = f
	} else {
		f, err := s.images.get(ctx, snap.ParentIDs[0])
		if err != nil {
			return nil, err
		}
		file = f
	}
	return s.ext4Mount(ctx, dir, file, true)
}

// lowerDirs lists the upper directories of an extraction's parents, top
// first, as overlayfs wants them. containerd's walking differ looks there
// for the metadata of a directory that a layer writes into without an
// entry of its own: without them, it would make such a directory 0755,
// owned by root, over the parent layer's. Parents that kiln's differ
// stored (their upper directory is empty) and anything below a committed
// container (an ext4 file) cannot help; with no parent directory at all,
// the lower directory is an empty one.
func (s *Snapshotter) lowerDirs(parents []string) string {
	var dirs []string
	for _, id := range parents {
		if !exists(filepath.Join(s.dir(id), layerMarker)) {
			break
		}
		dirs = append(dirs, filepath.Join(s.dir(id), upperDir))
	}
	if len(dirs) == 0 {
		return filepath.Join(s.root, "empty")
	}
	return strings.Join(dirs, ":")
}

// ext4Mount describes an ext4 file the way containerd's blockfile
// snapshotter does, or as an attached loop device in block-device mode.
func (s *Snapshotter) ext4Mount(ctx context.Context, dir, file string, readOnly bool) ([]mount.Mount, error) {
	mode := "rw"
	if readOnly {
		mode = "ro"
	}
	if !s.cfg.BlockDevices {
		return []mount.Mount{{Type: "ext4", Source: file, Options: []string{mode, "loop"}}}, nil
	}
	dev, err := s.loops.attach(ctx, dir, file, readOnly)
	if err != nil {
		return nil, err
	}
	return []mount.Mount{{Type: "ext4", Source: dev, Options: []string{mode}}}, nil
}

// Commit turns an active snapshot into a committed one. It only records
// the change: containerd holds its own metadata transaction meanwhile.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var id string
	var layer bool
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		oid, _, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		dir := s.dir(oid)
		_, err = os.Stat(filepath.Join(dir, layerMarker))
		layer = err == nil
		usage, err := diskUsage(dir)
		if err != nil {
			return err
		}
		id, err = storage.CommitActive(ctx, key, name, usage, opts...)
		return err
	})
	if err != nil {
		return err
	}
	if layer && s.cfg.EagerBuild {
		s.images.startEager(id)
	}
	return nil
}

// Remove deletes a snapshot and its files.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var id, renamed string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to remove snapshot %q: %w", key, err)
		}
		renamed = filepath.Join(s.root, "snapshots", "rm-"+id)
		if err := os.Rename(s.dir(id), renamed); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("failed to remove snapshot %q: %w", key, err)
			}
			renamed = ""
		}
		return nil
	})
	if err != nil {
		if renamed != "" {
			if err := os.Rename(renamed, s.dir(id)); err != nil {
				log.G(ctx).WithError(err).WithField("path", renamed).Error("failed to restore snapshot after a failed remove")
			}
		}
		return err
	}
	s.images.forget(id)
	s.staged.drop(id)
	if renamed != "" {
		s.loops.detachDir(ctx, renamed)
		if err := os.RemoveAll(renamed); err != nil {
			// Cleanup removes any rm-* left behind.
			log.G(ctx).WithError(err).WithField("path", renamed).Warn("failed to remove snapshot files")
		}
	}
	return nil
}

// Cleanup removes what interrupted operations left: directories of
// snapshots that do not exist, stale build directories, loop devices of
// removed snapshots.
//
// containerd calls it after its garbage collection, while snapshots may be
// created. The orphans are listed in a write transaction, which no create
// runs alongside (create makes the directory in its own), and snapshot IDs
// are never reused: a directory that is an orphan then stays one, and any
// other directory belongs to a snapshot, maybe one created since.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var orphans []string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		ents, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
		if err != nil {
			return err
		}
		for _, e := range ents {
			if _, ok := ids[e.Name()]; !ok {
				orphans = append(orphans, filepath.Join(s.root, "snapshots", e.Name()))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, dir := range orphans {
		s.loops.detachDir(ctx, dir)
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("cleanup failed")
		}
	}
	workdir.RemoveStale(filepath.Join(s.root, "tmp"))
	if s.cfg.BlockDevices {
		// The directories left are live ones (but for a removal's rm-*
		// that failed above): keep the devices they record.
		s.loops.detachStale(ctx, s.root)
	}
	return nil
}

// Close releases the database and stops background builds.
func (s *Snapshotter) Close() error {
	s.images.close()
	s.staged.close()
	return s.ms.Close()
}

// SnapshotDir returns the directory of the extraction snapshot that an
// overlay mount's upperdir option points into, if it is one of this
// snapshotter's; kiln's differ uses it to recognise its own mounts.
func (s *Snapshotter) SnapshotDir(m mount.Mount) (string, bool) {
	if m.Type != "overlay" {
		return "", false
	}
	for _, o := range m.Options {
		upper, ok := strings.CutPrefix(o, "upperdir=")
		if !ok {
			continue
		}
		dir := filepath.Dir(filepath.Clean(upper))
		if filepath.Dir(dir) != filepath.Join(s.root, "snapshots") || filepath.Base(upper) != upperDir {
			return "", false
		}
		if _, err := os.Stat(filepath.Join(dir, layerMarker)); err != nil {
			return "", false
		}
		return dir, true
	}
	return "", false
}

// LayerFiles says where kiln's differ stores a layer in a snapshot
// directory: the uncompressed tar and its digest.
func LayerFiles(dir string) (tarPath, diffIDPath string) {
	return filepath.Join(dir, layerTar), filepath.Join(dir, diffIDFile)
}
