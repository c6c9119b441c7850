package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/chunked"
)

// Image is what the cache records about a built image, in a sidecar
// <key>.json next to it, and what kiln cache ls shows.
type Image struct {
	Key string `json:"key"`
	// Image is the reference it was first built from, Refs every
	// reference a conversion served from it.
	Image    string            `json:"image"`
	Digest   digest.Digest     `json:"digest,omitempty"`
	Platform string            `json:"platform,omitempty"`
	ChainID  digest.Digest     `json:"chain_id,omitempty"`
	Layers   []digest.Digest   `json:"layers,omitempty"`
	Options  map[string]string `json:"options,omitempty"`
	Refs     []string          `json:"refs,omitempty"`
	Built    time.Time         `json:"built"`
	LastUsed time.Time         `json:"last_used"`
	// Size is the file's length, Allocated the bytes it takes on disk
	// (it is sparse); both are filled in by List, not recorded.
	Size      int64 `json:"size"`
	Allocated int64 `json:"allocated"`
}

// Blob is a cached layer blob.
type Blob struct {
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	Allocated int64         `json:"allocated"`
	LastUsed  time.Time     `json:"last_used"`
}

// Listing is what the cache holds, least recently used first.
type Listing struct {
	Images []Image `json:"images"`
	Blobs  []Blob  `json:"blobs"`
	// Chunks sums up the chunk cache of lazily loaded images (kiln
	// mount), which Prune evicts a chunk at a time.
	Chunks Chunks                `json:"chunks"`
	chunks []chunked.CachedChunk // in no order: Prune orders them with the rest
}

// Chunks is what a chunk cache holds, or what was removed from it.
type Chunks struct {
	Count     int       `json:"count"`
	Allocated int64     `json:"allocated"`
	LastUsed  time.Time `json:"last_used,omitzero"`
}

func (c *Chunks) add(f chunked.CachedChunk) {
	c.Count++
	c.Allocated += allocated(f.Info)
	if t := f.Info.ModTime().UTC(); t.After(c.LastUsed) {
		c.LastUsed = t
	}
}

// Total is the bytes the listing takes on disk.
func (l *Listing) Total() int64 {
	n := l.Chunks.Allocated
	for _, im := range l.Images {
		n += im.Allocated
	}
	for _, b := range l.Blobs {
		n += b.Allocated
	}
	return n
}

func (s *Store) sidecarPath(key string) string {
	return filepath.Join(s.root, "rootfs", key+".json")
}

// RecordUse notes in the image's sidecar that a conversion used it now,
// from the reference in im. The first record keeps im whole; later ones
// add the reference and move the last use.
func (s *Store) RecordUse(ctx context.Context, im Image) error {
	if !validKey(im.Key) {
		return fmt.Errorf("invalid build key %q", im.Key)
	}
	// Runs serving the same image at once would lose each other's
	// reference without this.
	l, err := lockFile(ctx, s.recordLockPath(im.Key), true)
	if err != nil {
		return err
	}
	defer l.Unlock()
	now := time.Now().UTC()
	rec, err := s.readSidecar(im.Key)
	if err != nil {
		rec = im
		rec.Built = now
	}
	rec.Size, rec.Allocated = 0, 0
	rec.LastUsed = now
	if im.Image != "" && !slices.Contains(rec.Refs, im.Image) {
		rec.Refs = append(rec.Refs, im.Image)
	}
	return writeFileAtomic(s.sidecarPath(im.Key), rec)
}

func (s *Store) readSidecar(key string) (Image, error) {
	var im Image
	b, err := os.ReadFile(s.sidecarPath(key))
	if err != nil {
		return im, err
	}
	if err := json.Unmarshal(b, &im); err != nil {
		return im, fmt.Errorf("%s: %w", s.sidecarPath(key), err)
	}
	return im, nil
}

// writeFileAtomic writes v as JSON to a temporary file beside path and
// renames it over path: readers see the old record or the new one.
func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("recording %s: %w", path, err)
	}
	return nil
}

// allocated is the bytes a file takes on disk.
func allocated(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// List reads what the cache holds, least recently used first. An image
// without a sidecar (built before kiln kept them) shows its file's
// modification time as its last use.
func (s *Store) List(ctx context.Context) (*Listing, error) {
	var out Listing
	dir := filepath.Join(s.root, "rootfs")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading the cache: %w", err)
	}
	for _, e := range ents {
		key, ok := strings.CutSuffix(e.Name(), ".ext4")
		if !ok || !validKey(key) {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		im, err := s.readSidecar(key)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				log.G(ctx).WithError(err).Warn("unreadable record of a cached image")
			}
			im = Image{LastUsed: fi.ModTime().UTC(), Built: fi.ModTime().UTC()}
		}
		im.Key, im.Size, im.Allocated = key, fi.Size(), allocated(fi)
		out.Images = append(out.Images, im)
	}
	err = s.content.Walk(ctx, func(info content.Info) error {
		fi, err := os.Stat(s.blobPath(info.Digest))
		if err != nil {
			return nil // removed meanwhile
		}
		b := Blob{Digest: info.Digest, Size: info.Size, Allocated: allocated(fi), LastUsed: fi.ModTime().UTC()}
		if li, err := os.Stat(s.blobLockPath(info.Digest)); err == nil && li.ModTime().After(b.LastUsed) {
			b.LastUsed = li.ModTime().UTC()
		}
		out.Blobs = append(out.Blobs, b)
		return nil
	})
	// The blob store makes its directory with its first blob: a cache
	// that has none (only layouts or kiln mount used it) lists none.
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading the cache's blobs: %w", err)
	}
	if out.chunks, err = chunked.ListStore(chunked.StoreDir(s.root)); err != nil {
		return nil, fmt.Errorf("reading the chunk cache: %w", err)
	}
	for _, c := range out.chunks {
		out.Chunks.add(c)
	}
	sort.SliceStable(out.Images, func(i, j int) bool { return out.Images[i].LastUsed.Before(out.Images[j].LastUsed) })
	sort.SliceStable(out.Blobs, func(i, j int) bool { return out.Blobs[i].LastUsed.Before(out.Blobs[j].LastUsed) })
	return &out, nil
}

// Find returns the cached images that args name: a build key or a unique
// prefix of one, or a reference or image digest they were built from.
func Find(l *Listing, args []string) ([]Image, error) {
	var found []Image
	seen := map[string]bool{}
	for _, arg := range args {
		var byKey, byRef []Image
		for _, im := range l.Images {
			switch {
			case strings.HasPrefix(im.Key, arg) && validKey(arg):
				byKey = append(byKey, im)
			case arg == im.Image || arg == im.Digest.String() || slices.Contains(im.Refs, arg):
				byRef = append(byRef, im)
			}
		}
		match := byRef
		switch {
		case len(byKey) > 1:
			return nil, fmt.Errorf("%q is the start of %d build keys: give more of it", arg, len(byKey))
		case len(byKey) == 1:
			match = byKey
		case len(byRef) == 0:
			return nil, fmt.Errorf("no cached image is %q", arg)
		}
		for _, im := range match {
			if !seen[im.Key] {
				seen[im.Key] = true
				found = append(found, im)
			}
		}
	}
	return found, nil
}

// ErrInUse says a running conversion holds an entry.
var ErrInUse = errors.New("in use by a running kiln convert")

// RemoveImage removes the image built under key, unless a running
// conversion holds it (ErrInUse). The image is renamed into tmp/ before
// it is deleted, which is atomic: a crash leaves it whole in the cache or
// garbage that the next run deletes.
func (s *Store) RemoveImage(key string) error {
	if !validKey(key) {
		return fmt.Errorf("invalid build key %q", key)
	}
	l, err := lockToRemove(s.rootfsLockPath(key), "image "+key)
	if err != nil {
		return err
	}
	defer l.Unlock()
	trash, err := os.MkdirTemp(filepath.Join(s.root, "tmp"), "trash-rm-")
	if err != nil {
		return fmt.Errorf("removing image %s: %w", key, err)
	}
	defer os.RemoveAll(trash)
	// The record goes first: a crash in between leaves an image without
	// one, which is still listed, never a record without its image.
	if err := os.Remove(s.sidecarPath(key)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing image %s: %w", key, err)
	}
	if err := os.Rename(s.RootfsPath(key), filepath.Join(trash, key+".ext4")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing image %s: %w", key, err)
	}
	// Its lock files go with it. Records of its use are made under the
	// image's lock, so nobody holds the record's now. The image is gone
	// whatever becomes of them: a prune removes one left behind.
	meta, err := tryLock(s.recordLockPath(key))
	if err == nil && meta != nil {
		err = meta.removeFile()
		meta.Unlock()
	}
	if err == nil {
		err = l.removeFile()
	}
	if err != nil {
		log.L.WithError(err).WithField("image", key).Warn("removing the image's lock files")
	}
	return nil
}

// lockToRemove takes an entry's lock exclusively, or says that a running
// conversion holds it.
func lockToRemove(path, what string) (*Lock, error) {
	l, err := tryLock(path)
	if err == nil && l == nil {
		err = fmt.Errorf("%s: %w", what, ErrInUse)
	}
	return l, err
}

// RemoveBlob removes a layer blob, unless a running conversion holds it
// (ErrInUse). Deleting a blob is one unlink.
func (s *Store) RemoveBlob(ctx context.Context, d digest.Digest) error {
	l, err := lockToRemove(s.blobLockPath(d), "blob "+d.String())
	if err != nil {
		return err
	}
	defer l.Unlock()
	if err := s.content.Delete(ctx, d); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("removing blob %s: %w", d, err)
	}
	if err := l.removeFile(); err != nil {
		log.G(ctx).WithError(err).WithField("blob", d.String()).Warn("removing the blob's lock file")
	}
	return nil
}

// Manage takes the cache's management lock: prunes and removals run one
// at a time, so that they count sizes right. Conversions do not take it.
func (s *Store) Manage(ctx context.Context) (*Lock, error) {
	return lockFile(ctx, filepath.Join(s.root, "locks", "manage"), true)
}

// manageList takes the management lock and lists the cache.
func (s *Store) manageList(ctx context.Context) (*Lock, *Listing, error) {
	l, err := s.Manage(ctx)
	if err != nil {
		return nil, nil, err
	}
	list, err := s.List(ctx)
	if err != nil {
		l.Unlock()
		return nil, nil, err
	}
	return l, list, nil
}

// Removed is what a prune removed and what it had to leave.
type Removed struct {
	Images  []Image `json:"images"`
	Blobs   []Blob  `json:"blobs"`
	Chunks  Chunks  `json:"chunks"`
	Skipped int     `json:"skipped"` // held by running conversions
	Freed   int64   `json:"freed"`
	Left    int64   `json:"left"` // bytes the cache still takes
}

// Prune evicts least recently used images, blobs and chunks until the
// cache takes at most maxSize bytes on disk (everything with maxSize <
// 0). Images and blobs a running conversion holds are skipped, so the
// cache may stay above maxSize. Chunks are never held: a running kiln
// mount fetches an evicted one again when it is read.
func (s *Store) Prune(ctx context.Context, maxSize int64) (*Removed, error) {
	l, list, err := s.manageList(ctx)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	res := &Removed{Left: list.Total()}
	// One least-recently-used order; at equal times images go first,
	// then blobs, then chunks.
	type entry struct {
		used   time.Time
		remove func() (int64, error)
	}
	var order []entry
	for _, im := range list.Images {
		order = append(order, entry{im.LastUsed, func() (int64, error) {
			err := s.RemoveImage(im.Key)
			if err == nil {
				res.Images = append(res.Images, im)
			}
			return im.Allocated, err
		}})
	}
	for _, b := range list.Blobs {
		order = append(order, entry{b.LastUsed, func() (int64, error) {
			err := s.RemoveBlob(ctx, b.Digest)
			if err == nil {
				res.Blobs = append(res.Blobs, b)
			}
			return b.Allocated, err
		}})
	}
	for _, c := range list.chunks {
		order = append(order, entry{c.Info.ModTime(), func() (int64, error) {
			err := os.Remove(c.Path)
			if errors.Is(err, os.ErrNotExist) {
				return allocated(c.Info), nil // gone meanwhile: it takes no room either
			}
			if err == nil {
				res.Chunks.add(c)
			}
			return allocated(c.Info), err
		}})
	}
	sort.SliceStable(order, func(i, j int) bool { return order[i].used.Before(order[j].used) })
	s.removeStrayLocks(ctx)
	for _, e := range order {
		if res.Left <= maxSize {
			break
		}
		size, err := e.remove()
		switch {
		case errors.Is(err, ErrInUse):
			res.Skipped++
			log.G(ctx).WithError(err).Debug("not evicting it")
			continue
		case err != nil:
			return res, err
		}
		res.Freed += size
		res.Left -= size
	}
	return res, nil
}

// removeStrayLocks removes the lock files of blobs and images the cache
// does not hold (a fetch that failed leaves its blob's), each while
// holding it, unless somebody does. The caller holds the management
// lock. A lock file it cannot remove only takes an inode: it logs that.
func (s *Store) removeStrayLocks(ctx context.Context) {
	dir := filepath.Join(s.root, "locks")
	ents, err := os.ReadDir(dir)
	if err != nil {
		log.G(ctx).WithError(err).Warn("reading the cache's locks")
		return
	}
	for _, e := range ents {
		name := e.Name()
		var present func() bool
		switch key, d := lockOwner(name); {
		case key != "":
			present = func() bool { return s.HasRootfs(key) }
		case d != "":
			present = func() bool {
				_, err := s.content.Info(ctx, d)
				return !errdefs.IsNotFound(err)
			}
		default:
			continue // the management lock, or not kiln's
		}
		if present() {
			continue
		}
		l, err := tryLock(filepath.Join(dir, name))
		if err != nil || l == nil {
			continue // held: in use, or being fetched
		}
		if !present() {
			err = l.removeFile()
		}
		l.Unlock()
		if err != nil {
			log.G(ctx).WithError(err).WithField("lock", name).Warn("removing a stray lock file")
		}
	}
}

// RemoveUnusedBlobs removes the blobs that no cached image was built
// from: a rebuild of a cached image with other options needs its blobs,
// nothing else does. Blobs that running conversions hold are skipped.
func (s *Store) RemoveUnusedBlobs(ctx context.Context) (*Removed, error) {
	l, list, err := s.manageList(ctx)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	needed := map[digest.Digest]bool{}
	for _, im := range list.Images {
		for _, d := range im.Layers {
			needed[d] = true
		}
	}
	res := &Removed{Left: list.Total()}
	for _, b := range list.Blobs {
		if needed[b.Digest] {
			continue
		}
		err := s.RemoveBlob(ctx, b.Digest)
		switch {
		case errors.Is(err, ErrInUse):
			res.Skipped++
			continue
		case err != nil:
			return res, err
		}
		res.Blobs = append(res.Blobs, b)
		res.Freed += b.Allocated
		res.Left -= b.Allocated
	}
	return res, nil
}
