package convert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/chunked"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/share"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Lazy is a published chunked rootfs opened for reading on demand.
type Lazy struct {
	Image    *image.Image
	Artifact string
	Key      string
	// RootHash is the verity root hash the artifact says, for a verity
	// build.
	RootHash string
	*chunked.Reader

	profile string // where the boot profile is kept
	hadOne  bool
}

// OpenLazy finds the chunked rootfs of src, built with opts, that kiln
// push --chunked published beside it, and opens it: chunks are read from
// the chunk cache in opts.CacheDir (within what opts.CacheMaxSize leaves
// beside the cache's images and blobs, least recently used first out) or
// fetched, verified and cached. A
// fetch taking longer than timeout fails the read.
func OpenLazy(ctx context.Context, src string, opts Options, timeout time.Duration) (*Lazy, error) {
	cacheDir := opts.CacheDir
	if err := workdir.Private(cacheDir); err != nil {
		return nil, fmt.Errorf("cache directory: %w", err)
	}
	img, err := image.Resolve(ctx, src, opts.Image)
	if err != nil {
		return nil, err
	}
	if !img.Remote {
		return nil, fmt.Errorf("image %s: only an image in a registry has a chunked rootfs beside it", img.Name)
	}
	for _, p := range opts.Inject.Pieces {
		if p == guest.PieceInit {
			// The init piece's config goes into each copy of the image;
			// a shared, read-only image cannot take it.
			return nil, fmt.Errorf("image %s: a lazily loaded rootfs cannot have the init piece (its image config is written into each copy): boot it with kiln-init from an initramfs instead", img.Name)
		}
	}
	set, err := inject.New(opts.Inject)
	if err != nil {
		return nil, err
	}
	opts.Build.Inject = set
	id := build.IdentityOf(img.ChainID(), opts.Build)
	server, err := image.Server(ctx, img.Name, opts.Image)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name, err)
	}
	// Not written whole: only the build's own size bounds it (and the
	// index's bounds).
	maxSize := int64(1 << 62)
	if opts.Build.Size > 0 {
		maxSize = share.MaxImageSize(opts.Build, cacheDir)
	}
	c, err := share.FindChunked(ctx, server, img.Digest, id, maxSize)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name, err)
	}
	budget, err := chunkBudget(ctx, cacheDir, opts.CacheMaxSize)
	if err != nil {
		return nil, err
	}
	st, err := chunked.OpenStore(chunked.StoreDir(cacheDir), budget)
	if err != nil {
		return nil, fmt.Errorf("chunk cache: %w", err)
	}
	r, err := chunked.NewReader(c.Index, c.Fetcher, st, timeout)
	if err != nil {
		return nil, err
	}
	return NewLazy(img, c, id.Key, r, cacheDir), nil
}

// NewLazy is the chunked rootfs c of the build key, read through r, of
// image img; its boot profile is kept under dir.
func NewLazy(img *image.Image, c *share.Chunked, key string, r *chunked.Reader, dir string) *Lazy {
	return &Lazy{
		Image: img, Artifact: c.Artifact.String(), Key: key, RootHash: c.RootHash, Reader: r,
		profile: filepath.Join(dir, "profiles", key+".json"),
	}
}

// chunkBudget is what the chunk cache may take of the cache's budget
// maxSize (0: no budget): what the cached images and blobs leave of it,
// and at least a tenth. The mount evicts only chunks; kiln convert and
// kiln cache prune evict the rest.
func chunkBudget(ctx context.Context, cacheDir string, maxSize int64) (int64, error) {
	if maxSize <= 0 {
		return 0, nil
	}
	st, err := store.Open(cacheDir)
	if err != nil {
		return 0, err
	}
	list, err := st.List(ctx)
	if err != nil {
		return 0, err
	}
	return max(maxSize-(list.Total()-list.Chunks.Allocated), maxSize/10), nil
}

// profileFile is a boot profile: the chunks a boot read, first read
// first.
type profileFile struct {
	Chunks []int `json:"chunks"`
}

// Prefetch fetches, in the background of a mount, first the chunks of
// the recorded boot profile, then with all the rest of the image in
// order, workers at a time, until done or ctx ends.
func (l *Lazy) Prefetch(ctx context.Context, all bool, workers int) error {
	var order []int
	if raw, err := os.ReadFile(l.profile); err == nil {
		var p profileFile
		if err := json.Unmarshal(raw, &p); err != nil {
			log.G(ctx).WithError(err).WithField("profile", l.profile).Warn("ignoring an unreadable boot profile")
		} else {
			order, l.hadOne = p.Chunks, true
		}
	}
	if all {
		for i := range l.Index().Chunks {
			order = append(order, i)
		}
	}
	if len(order) == 0 {
		return nil
	}
	err := l.Reader.Prefetch(ctx, order, workers)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// SaveProfile records the chunks read so far as the image's boot profile,
// unless it had one already or nothing was read.
func (l *Lazy) SaveProfile() error {
	if l.hadOne {
		return nil
	}
	if _, err := os.Stat(l.profile); err == nil {
		return nil
	}
	chunks := l.Profile()
	if len(chunks) == 0 {
		return nil
	}
	raw, err := json.Marshal(profileFile{Chunks: chunks})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(l.profile), 0o700); err != nil {
		return err
	}
	tmp := l.profile + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, l.profile)
}
