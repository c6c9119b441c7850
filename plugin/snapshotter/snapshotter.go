// Package snapshotter is kiln's containerd snapshotter. Image layers are
// stored as they arrive (a verified layer tar per snapshot, written by
// kiln's differ); each committed chain gets one ext4 disk, built once from
// those layers and shared read-only; a container gets a small writable
// disk of its own that overlays the shared one (overlay mode) or a whole
// copy of it (copy mode). See layout.go for what a snapshot directory
// holds.
//
// Every metadata change happens in a storage.MetaStore transaction; work
// that must not be undone (deleting files) happens after it commits, and
// long work (building a disk, copying one) happens before it, outside any
// transaction.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"runtime"
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
	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Images is what kiln asks containerd's image store.
type Images interface {
	// Config returns the config document of the image named ref in
	// namespace ns or, without ref, the one config that the images whose
	// layers make chainID agree on. It fails with errdefs.ErrNotFound
	// when there is none and errdefs.ErrConflict when they disagree.
	Config(ctx context.Context, ns, ref string, chainID digest.Digest) ([]byte, error)
	// Tops returns the chain IDs of every image's layers in every
	// namespace: the snapshots containers of an image are made on.
	Tops(ctx context.Context) (map[digest.Digest]bool, error)
	// Named returns the images in namespace ns whose layers make
	// chainID, each with the digest of its manifest of those layers.
	Named(ctx context.Context, ns string, chainID digest.Digest) ([]NamedImage, error)
}

// NamedImage is an image of containerd's, and one of its manifests.
type NamedImage struct {
	Name     string
	Manifest digest.Digest
}

// Config configures a Snapshotter.
type Config struct {
	// Root holds kiln's state.
	Root string
	// BlockDevices makes Mounts attach loop devices and return them, for
	// shims that accept only block devices.
	BlockDevices bool
	// ContainerMode is ModeOverlay (the default) or ModeCopy.
	ContainerMode string
	// DefaultSize is the size of an overlay-mode container's scratch disk,
	// and of a container without a parent (bytes; 0: 1 GiB).
	DefaultSize int64
	// MaxBuilds bounds the disks built at once (0: half the CPUs, at
	// least one).
	MaxBuilds int
	// EagerBuild builds a disk as soon as a layer is committed, instead
	// of at the first container, view or export.
	EagerBuild bool
	// UnusedDiskGrace is how long a disk nothing needs is kept (see
	// sweep.go).
	UnusedDiskGrace time.Duration
	// Build are the options disks are built with; Inject adds guest
	// pieces to every disk.
	Build  build.Options
	Inject inject.Options
	// Images answers questions about containerd's images; without it,
	// containers get no image config and unneeded disks stay.
	Images Images
	// ObserveBuild and ObserveBuildWait, if set, are told how each build
	// went and how long it waited to start.
	ObserveBuild     func(d time.Duration, err error)
	ObserveBuildWait func(urgent bool, d time.Duration)
	// Share fetches disks from, and publishes them to, the images'
	// registries; ObserveShare, if set, is told what happened to each
	// disk that could be shared (one of ShareResults).
	Share        Share
	ObserveShare func(result string)
}

// Snapshotter implements snapshots.Snapshotter (and snapshots.Cleaner).
type Snapshotter struct {
	root         string
	ms           *storage.MetaStore
	blockDevices bool
	verity       bool // disks carry a dm-verity tree (see Stat)
	mode         string
	eager        bool
	images       Images
	disks        *diskBuilder
	containers   *containerMaker
	staged       *stagedTrees
	loops        *loops
	queue        *buildQueue
	sweeper      *sweeper
	lazy         *lazyImages // nil unless Share.Lazy
}

var _ snapshots.Cleaner = (*Snapshotter)(nil)

// New opens (or creates) the snapshotter state under cfg.Root.
func New(ctx context.Context, cfg Config) (*Snapshotter, error) {
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = 1 << 30
	}
	if cfg.ContainerMode == "" {
		cfg.ContainerMode = ModeOverlay
	}
	if err := ValidMode(cfg.ContainerMode); err != nil {
		return nil, err
	}
	if cfg.MaxBuilds <= 0 {
		cfg.MaxBuilds = max(runtime.NumCPU()/2, 1)
	}
	set, err := inject.New(cfg.Inject)
	if err != nil {
		return nil, err
	}
	// The kernel names a loop device's file by its resolved path, and
	// kiln recognises its files by path.
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return nil, err
	}
	for _, d := range []string{snapshotsDir, tmpDir, emptyDir} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, err
		}
	}
	// The empty lower directory of extraction mounts must be searchable.
	if err := os.Chmod(filepath.Join(root, emptyDir), 0o755); err != nil {
		return nil, err
	}
	if err := migrateLayout(root); err != nil {
		return nil, fmt.Errorf("moving the files of an earlier kiln: %w", err)
	}
	if err := dropStaleDisks(root, build.Key("", build.Options{Size: cfg.Build.Size, Inject: set, Writer: cfg.Build.Writer, Verity: cfg.Build.Verity})); err != nil {
		return nil, fmt.Errorf("removing disks built with other options: %w", err)
	}
	removeLeftovers(filepath.Join(root, tmpDir))
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, err
	}
	s := &Snapshotter{
		root:         root,
		ms:           ms,
		blockDevices: cfg.BlockDevices,
		verity:       cfg.Build.Verity,
		mode:         cfg.ContainerMode,
		eager:        cfg.EagerBuild,
		images:       cfg.Images,
		containers:   &containerMaker{root: root, defaultSize: cfg.DefaultSize},
		staged:       &stagedTrees{opts: cfg.Build},
		loops:        &loops{},
		queue:        newBuildQueue(cfg.MaxBuilds, cfg.ObserveBuildWait),
	}
	s.disks = newDiskBuilder(root, chainReader{ms: ms, root: root, registries: cfg.Share.Image, stall: lazyStall(cfg.Share)}, s.staged, cfg.Build, set, s.queue, cfg.ObserveBuild)
	s.disks.share, s.disks.onShare = cfg.Share, cfg.ObserveShare
	// What an interrupted run left: directories of snapshots that were
	// never recorded or are half removed.
	orphans, err := s.sweepOrphans(ctx, true)
	if err != nil {
		ms.Close()
		return nil, err
	}
	s.loops.settle(ctx, root)
	if cfg.Share.Lazy {
		// After the loop devices: those on the dead mounts of lazily
		// loaded disks are known by their files' paths until the
		// mounts are cleared.
		opts := cfg.Build
		opts.Inject = set
		s.lazy = newLazyImages(root, cfg.Share, opts, cfg.Images, cfg.ObserveShare)
		s.disks.lazy = s.lazy
	}
	for _, dir := range orphans {
		os.RemoveAll(dir)
	}
	s.disks.settleUnsynced(ctx)
	if s.images != nil {
		s.sweeper = startSweeper(s, cfg.UnusedDiskGrace)
	}
	return s, nil
}

// removeLeftovers removes what interrupted runs left in the tmp
// directory: build directories nobody holds, containers being made, disks
// being removed.
func removeLeftovers(tmp string) {
	workdir.RemoveStale(tmp)
	for _, pattern := range []string{"new-*", "rm-disk-*"} {
		left, _ := filepath.Glob(filepath.Join(tmp, pattern))
		for _, p := range left {
			os.RemoveAll(p)
		}
	}
}

func (s *Snapshotter) dir(id string) string { return filepath.Join(s.root, snapshotsDir, id) }

// LabelVerityPrefix starts the labels that describe the dm-verity tree of
// a disk built with [build] verity: Stat gives them to a committed
// snapshot whose disk is built and to a view of one, as
// LabelVerityPrefix + "root-hash", "hash-offset", "data-blocks", ... (see
// verity.Info.Labels). containerd merges them into the labels it reports.
const LabelVerityPrefix = "containerd.io/snapshot/kiln.verity."

// Stat returns the info of a snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	var disk string // the disk whose verity tree the labels describe
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var id string
		id, info, _, err = storage.GetInfo(ctx, key)
		if err != nil || !s.verity {
			return err
		}
		switch {
		case info.Kind == snapshots.KindCommitted:
		case info.Kind == snapshots.KindView && info.Parent != "":
			if id, _, _, err = storage.GetInfo(ctx, info.Parent); err != nil {
				return err
			}
		default:
			return nil
		}
		disk = filepath.Join(s.dir(id), diskFile)
		return nil
	})
	if err != nil || disk == "" || !exists(disk) {
		return info, err
	}
	// Disks are built when first needed: until then there is nothing to
	// describe.
	v, err := verity.Describe(disk)
	if err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("describing the dm-verity tree of a disk")
		return info, nil
	}
	if info.Labels == nil {
		info.Labels = map[string]string{}
	}
	maps.Copy(info.Labels, v.Labels(LabelVerityPrefix))
	return info, nil
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

// Usage reports the disk a snapshot uses itself, its parents excluded:
// what its directory holds now, its disk and container disks included.
func (s *Snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	var id string
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return usage, err
	}
	return diskUsage(s.dir(id))
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
// for a differ to fill; anything else is a container.
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
			if id, err := s.committedID(ctx, parent); err == nil {
				s.disks.cancelEager(id)
			}
		}
		if s.lazy != nil {
			if handled, err := s.prepareLazy(ctx, key, parent, info, opts); handled {
				return nil, err
			}
		}
		return s.create(ctx, snapshots.KindActive, key, parent, opts, s.prepareLayer)
	}
	req, release, err := s.containerRequest(ctx, parent, info.Labels)
	if err != nil {
		return nil, err
	}
	defer release()
	return s.create(ctx, snapshots.KindActive, key, parent, opts, func(ctx context.Context, dir string) error {
		return s.containers.make(ctx, dir, req)
	})
}

// containerRequest works out what a new container's disk needs: its mode
// and size from the labels and the configuration, its parent's disk
// (built if needed and pinned until release), and the image config to
// write into it.
func (s *Snapshotter) containerRequest(ctx context.Context, parent string, labels map[string]string) (containerRequest, func(), error) {
	req := containerRequest{mode: s.mode}
	noop := func() {}
	if m := labels[LabelContainerMode]; m != "" {
		if err := ValidMode(m); err != nil {
			return req, noop, fmt.Errorf("label %s: %w: %w", LabelContainerMode, err, errdefs.ErrInvalidArgument)
		}
		req.mode = m
	}
	if v := labels[snapshots.LabelSnapshotMaxSize]; v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return req, noop, fmt.Errorf("label %s=%q: %w", snapshots.LabelSnapshotMaxSize, v, errdefs.ErrInvalidArgument)
		}
		req.size = n
	}
	if parent == "" {
		return req, noop, nil
	}
	id, err := s.committedID(ctx, parent)
	if err != nil {
		return req, noop, err
	}
	disk, release, err := s.disks.acquire(ctx, id)
	if err != nil {
		return req, noop, err
	}
	req.disk = disk
	if req.config, err = s.containerConfig(ctx, parent, labels[LabelImage]); err != nil {
		release()
		return req, noop, err
	}
	return req, release, nil
}

// containerConfig returns the image config a container's disk gets when
// disks are built with the init piece (every disk is built with the
// configured pieces: see dropStaleDisks): the config of the image the
// LabelImage label names, or the one the images made of the parent's
// layers agree on. Without a label and an agreement the container gets
// none, and kiln-init says why if it boots.
func (s *Snapshotter) containerConfig(ctx context.Context, parent, ref string) ([]byte, error) {
	if s.images == nil || s.disks.inject.InitPath() == "" {
		return nil, nil
	}
	ns, _ := namespaces.Namespace(ctx)
	chainID, _ := digest.Parse(chainOf(parent))
	cfg, err := s.images.Config(ctx, ns, ref, chainID)
	if err == nil {
		return cfg, nil
	}
	if ref != "" {
		// The caller's label is wrong, whatever went wrong in looking.
		return nil, fmt.Errorf("label %s=%q: %v: %w", LabelImage, ref, err, errdefs.ErrInvalidArgument)
	}
	log.G(ctx).WithError(err).WithField("parent", parent).
		Warnf("the container's disk gets no image config; label the snapshot %s=IMAGE to choose one", LabelImage)
	return nil, nil
}

// chainOf returns the name containerd gave a committed snapshot, the
// chain ID for an image's layers, without the "<namespace>/<n>/" prefix
// containerd's metadata store adds.
func chainOf(name string) string {
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		return name[i+1:]
	}
	return name
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

// View creates a read-only snapshot of a committed one: its disk itself,
// shared.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if parent != "" {
		id, err := s.committedID(ctx, parent)
		if err != nil {
			return nil, err
		}
		_, release, err := s.disks.acquire(ctx, id)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	return s.create(ctx, snapshots.KindView, key, parent, opts, func(context.Context, string) error { return nil })
}

// committedID returns the id of a committed snapshot.
func (s *Snapshotter) committedID(ctx context.Context, key string) (string, error) {
	var id string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		sid, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindCommitted {
			return fmt.Errorf("parent %q is not committed: %w", key, errdefs.ErrInvalidArgument)
		}
		id = sid
		return nil
	})
	return id, err
}

// create makes a snapshot's directory with fill, outside any transaction,
// then records the snapshot and gives the directory its place in one.
func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt,
	fill func(ctx context.Context, dir string) error) ([]mount.Mount, error) {
	stage, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), "new-")
	if err != nil {
		return nil, err
	}
	if err := fill(ctx, stage); err != nil {
		os.RemoveAll(stage)
		return nil, err
	}
	var snap storage.Snapshot
	placed := ""
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		placed, err = s.place(snap.ID, stage)
		return err
	})
	if err != nil {
		if placed != "" {
			os.RemoveAll(placed) // the snapshot was not recorded
		}
		os.RemoveAll(stage)
		return nil, err
	}
	m, err := s.mounts(ctx, snap)
	if err != nil {
		// Recorded, but of no use to the caller, who learns of it only
		// through the error.
		if rerr := s.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("removing a snapshot whose mounts failed")
		}
		return nil, err
	}
	return m, nil
}

// place moves the directory stage to where snapshot id's directory is,
// in the transaction that records the snapshot, and returns that path.
// A transaction that failed to commit gives its snapshot ID out again: a
// directory of that ID belongs to no snapshot, and is moved out of the
// way.
func (s *Snapshotter) place(id, stage string) (string, error) {
	dir := s.dir(id)
	if exists(dir) {
		if err := os.Rename(dir, filepath.Join(s.root, snapshotsDir, removingPrefix+id+"-"+filepath.Base(stage))); err != nil {
			return "", err
		}
	}
	if err := os.Rename(stage, dir); err != nil {
		return "", err
	}
	return dir, nil
}

func (s *Snapshotter) prepareLayer(ctx context.Context, dir string) error {
	for _, d := range []string{upperDir, workDir} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
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

// mounts describes a snapshot's filesystem:
//
//   - an extraction: an overlay whose upper directory containerd's walking
//     differ can fill (kiln's differ recognises it and stores the layer
//     instead);
//   - a view: the parent's disk, read-only;
//   - an overlay-mode container: in the form containerd's mount manager
//     assembles (as for its erofs snapshotter's block mode): mount 0 is
//     the scratch disk, mount 1 the parent's disk, read-only, and mount 2
//     the overlay of upper/ and work/ on the scratch over the disk;
//   - a copy-mode container: its disk.
//
// A container's disks are "format/ext4" mounts: containerd's mount
// manager mounts them as ext4 (runc), a shim that claims the format
// transform gets them as they are (a microVM attaches them), and code
// that mounts snapshot mounts directly, such as containerd's walking
// differ, cannot mount a disk a guest wrote.
func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot) ([]mount.Mount, error) {
	dir := s.dir(snap.ID)
	if snap.Kind == snapshots.KindView {
		disk, err := s.parentDisk(ctx, snap)
		if err != nil {
			return nil, err
		}
		m, err := s.diskMount(ctx, dir, loopDisk, disk, true)
		if err != nil {
			return nil, err
		}
		return []mount.Mount{m}, nil
	}
	switch dirKind(dir) {
	case kindLayer:
		return []mount.Mount{{
			Type:   "overlay",
			Source: "overlay",
			Options: []string{
				"workdir=" + filepath.Join(dir, workDir),
				"upperdir=" + filepath.Join(dir, upperDir),
				"lowerdir=" + s.lowerDirs(snap.ParentIDs),
			},
		}}, nil
	case kindCopy:
		m, err := s.diskMount(ctx, dir, loopContainer, filepath.Join(dir, containerFile), false)
		if err != nil {
			return nil, err
		}
		return []mount.Mount{m}, nil
	case kindOverlay:
		disk, err := s.parentDisk(ctx, snap)
		if err != nil {
			return nil, err
		}
		scratch, err := s.diskMount(ctx, dir, loopScratch, filepath.Join(dir, scratchFile), false)
		if err != nil {
			return nil, err
		}
		lower, err := s.diskMount(ctx, dir, loopDisk, disk, true)
		if err != nil {
			return nil, err
		}
		return []mount.Mount{scratch, lower, {
			Type:   "format/mkdir/overlay",
			Source: "overlay",
			Options: []string{
				"X-containerd.mkdir.path={{ mount 0 }}/" + guest.ScratchUpper + ":0755",
				"X-containerd.mkdir.path={{ mount 0 }}/" + guest.ScratchWork + ":0755",
				"upperdir={{ mount 0 }}/" + guest.ScratchUpper,
				"workdir={{ mount 0 }}/" + guest.ScratchWork,
				"lowerdir={{ mount 1 }}",
			},
		}}, nil
	}
	return nil, fmt.Errorf("snapshot %s has no filesystem: %w", snap.ID, errdefs.ErrFailedPrecondition)
}

// parentDisk returns the disk under a view or an overlay-mode container,
// building it again if it went (a crash can take an unsynced disk): disks
// are derived, and the same layers give the same bytes.
func (s *Snapshotter) parentDisk(ctx context.Context, snap storage.Snapshot) (string, error) {
	if len(snap.ParentIDs) == 0 {
		return s.emptyDisk(ctx)
	}
	return s.disks.get(ctx, snap.ParentIDs[0])
}

// emptyDisk returns a small empty read-only disk for views without a
// parent.
func (s *Snapshotter) emptyDisk(ctx context.Context) (string, error) {
	p := filepath.Join(s.root, "empty.ext4")
	if exists(p) {
		return p, nil
	}
	tmp, err := os.MkdirTemp(filepath.Join(s.root, tmpDir), "new-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := ext4.Format(ctx, filepath.Join(tmp, "empty.ext4"), 16<<20, "", "kiln-empty", tmp); err != nil {
		return "", err
	}
	if err := os.Chmod(filepath.Join(tmp, "empty.ext4"), 0o444); err != nil {
		return "", err
	}
	return p, os.Rename(filepath.Join(tmp, "empty.ext4"), p)
}

// lowerDirs lists the upper directories of an extraction's parents, top
// first, as overlayfs wants them. containerd's walking differ looks there
// for the metadata of a directory that a layer writes into without an
// entry of its own: without them, it would make such a directory 0755,
// owned by root, over the parent layer's. Parents that kiln's differ
// stored (their upper directory is empty) and anything below a committed
// container cannot help; with no parent directory at all, the lower
// directory is an empty one.
func (s *Snapshotter) lowerDirs(parents []string) string {
	var dirs []string
	for _, id := range parents {
		if dirKind(s.dir(id)) != kindLayer {
			break
		}
		dirs = append(dirs, filepath.Join(s.dir(id), upperDir))
	}
	if len(dirs) == 0 {
		return filepath.Join(s.root, emptyDir)
	}
	return strings.Join(dirs, ":")
}

// diskMount describes a disk: read-only as an ext4 loop mount, writable as
// a format/ext4 one (see mounts), or an attached loop device in
// block-device mode.
func (s *Snapshotter) diskMount(ctx context.Context, dir, role, file string, readOnly bool) (mount.Mount, error) {
	typ, mode := "format/ext4", "rw"
	if readOnly {
		typ, mode = "ext4", "ro"
	}
	if !s.blockDevices {
		return mount.Mount{Type: typ, Source: file, Options: []string{mode, "loop"}}, nil
	}
	dev, err := s.loops.attach(ctx, dir, role, file, readOnly)
	if err != nil {
		return mount.Mount{}, err
	}
	return mount.Mount{Type: typ, Source: dev, Options: []string{mode}}, nil
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
		layer = dirKind(s.dir(oid)) == kindLayer
		// Usage is measured when asked for: a committed snapshot's disk
		// comes later.
		id, err = storage.CommitActive(ctx, key, name, snapshots.Usage{}, opts...)
		return err
	})
	if err != nil {
		return err
	}
	if layer && s.eager {
		s.disks.startEager(id)
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
		renamed = filepath.Join(s.root, snapshotsDir, removingPrefix+id)
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
	s.disks.forget(id)
	s.staged.drop(id)
	if s.lazy != nil {
		s.lazy.drop(ctx, id)
	}
	if renamed != "" {
		s.loops.detachDir(ctx, renamed)
		if err := os.RemoveAll(renamed); err != nil {
			// Cleanup removes any rm-* left behind.
			log.G(ctx).WithError(err).WithField("path", renamed).Warn("failed to remove snapshot files")
		}
	}
	if s.sweeper != nil {
		s.sweeper.soon()
	}
	return nil
}

// Cleanup removes what interrupted operations left: directories of
// snapshots that do not exist, stale build directories, loop devices of
// removed snapshots; then disks no image needs any more.
//
// containerd calls it after its garbage collection, while snapshots may be
// created. Orphans are found and renamed out of the way in a write
// transaction, which no create runs alongside (create renames its
// directory into place in its own), and deleted after it.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	orphans, err := s.sweepOrphans(ctx, false)
	if err != nil {
		return err
	}
	for _, dir := range orphans {
		s.loops.detachDir(ctx, dir)
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("cleanup failed")
		}
	}
	workdir.RemoveStale(filepath.Join(s.root, tmpDir))
	if s.sweeper != nil {
		s.sweeper.soon()
	}
	return nil
}

// sweepOrphans renames the directories of snapshots that do not exist to
// rm-* names and returns them (rm-* directories left before included).
// At startup (restore), the directory of a recorded snapshot that a
// removal interrupted before its transaction committed is put back.
func (s *Snapshotter) sweepOrphans(ctx context.Context, restore bool) ([]string, error) {
	var orphans []string
	base := filepath.Join(s.root, snapshotsDir)
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if errdefs.IsNotFound(err) {
			ids, err = map[string]string{}, nil // no snapshot yet
		}
		if err != nil {
			return err
		}
		ents, err := os.ReadDir(base)
		if err != nil {
			return err
		}
		for _, e := range ents {
			name := e.Name()
			if rest, ok := strings.CutPrefix(name, removingPrefix); ok {
				if _, live := ids[rest]; live && restore && !exists(filepath.Join(base, rest)) {
					if err := os.Rename(filepath.Join(base, name), filepath.Join(base, rest)); err != nil {
						return err
					}
					continue
				}
				orphans = append(orphans, filepath.Join(base, name))
				continue
			}
			if _, ok := ids[name]; ok {
				continue
			}
			to := filepath.Join(base, removingPrefix+name+"-orphan")
			if err := os.Rename(filepath.Join(base, name), to); err != nil {
				return err
			}
			orphans = append(orphans, to)
		}
		return nil
	})
	return orphans, err
}

// Close stops background work and releases the database.
func (s *Snapshotter) Close() error {
	if s.sweeper != nil {
		s.sweeper.stop()
	}
	if s.lazy != nil {
		s.lazy.close(context.Background())
	}
	s.disks.close()
	s.staged.close()
	return s.ms.Close()
}
