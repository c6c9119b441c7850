// Package store is kiln's cache directory for standalone conversion: layer
// blobs in a content-addressed store (containerd's local content store,
// which verifies what it ingests), built rootfs images keyed by what they
// were built from (each with a JSON record of its source and last use,
// for kiln cache), and private work directories that a later run cleans up
// if the run that made them was interrupted.
package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/workdir"
)

// Store is a cache directory.
type Store struct {
	root    string
	content content.Store
}

// DefaultDir is /var/cache/kiln for root and the user's cache directory
// otherwise.
func DefaultDir() string {
	if os.Geteuid() == 0 {
		// Not /var/lib/kiln: that is kiln serve's root, whose startup
		// clears its tmp/ of what it did not make.
		return "/var/cache/kiln"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "kiln")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("kiln-%d", os.Geteuid()))
}

// Open opens (creating if needed) the cache at root and removes work
// directories that interrupted runs left behind.
func Open(root string) (*Store, error) {
	for _, d := range []string{"content", "rootfs", "tmp", "locks"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("cache directory: %w", err)
		}
	}
	cs, err := local.NewStore(filepath.Join(root, "content"))
	if err != nil {
		return nil, fmt.Errorf("content store: %w", err)
	}
	workdir.RemoveStale(filepath.Join(root, "tmp"))
	st := &Store{root: root, content: cs}
	st.abortOldIngests()
	return st, nil
}

// abortOldIngests drops what earlier versions of kiln, which fetched
// blobs through the content store's ingests (refs kiln-DIGEST), left of
// fetches they did not finish: nothing resumes them now. An ingest whose
// blob's lock another run holds is left alone.
func (s *Store) abortOldIngests() {
	ctx := context.Background()
	sts, err := s.content.ListStatuses(ctx)
	if err != nil {
		return
	}
	for _, st := range sts {
		enc, ok := strings.CutPrefix(st.Ref, "kiln-")
		if !ok {
			continue
		}
		d, err := digest.Parse(enc)
		if err != nil {
			continue
		}
		l, err := tryLock(s.blobLockPath(d))
		if l == nil || err != nil {
			continue
		}
		if err := s.content.Abort(ctx, st.Ref); err != nil {
			log.G(ctx).WithError(err).WithField("ref", st.Ref).Warn("removing an unfinished fetch of an earlier kiln")
		}
		if _, err := s.content.Info(ctx, d); errdefs.IsNotFound(err) {
			l.removeFile() //nolint:errcheck // a prune removes it too
		}
		l.Unlock()
	}
}

// Content returns the blob store.
func (s *Store) Content() content.Store { return s.content }

// RootfsPath is where the image built under key lives.
func (s *Store) RootfsPath(key string) string {
	return filepath.Join(s.root, "rootfs", key+".ext4")
}

// HasRootfs reports whether an image was built under key.
func (s *Store) HasRootfs(key string) bool {
	_, err := os.Stat(s.RootfsPath(key))
	return err == nil
}

// PublishRootfs moves a finished image into the cache under im.Key and
// records where it came from. Rename is atomic: readers see the
// whole file or none.
func (s *Store) PublishRootfs(ctx context.Context, file string, im Image) (string, error) {
	key := im.Key
	dst := s.RootfsPath(key)
	if err := os.Chmod(file, 0o444); err != nil {
		return "", err
	}
	if err := os.Rename(file, dst); err != nil {
		return "", fmt.Errorf("publishing rootfs: %w", err)
	}
	// After the image, so that a crash leaves no record of an image
	// that is not there; an image without one is still listed.
	if err := s.RecordUse(ctx, im); err != nil {
		return "", err
	}
	return dst, nil
}

// blobPath is where the content store keeps blob d.
func (s *Store) blobPath(d digest.Digest) string {
	return filepath.Join(s.root, "content", "blobs", d.Algorithm().String(), d.Encoded())
}

// AddBlob moves file, which holds blob d as its caller checked, into
// the content store, read-only as the store keeps blobs; the caller
// holds the blob's lock exclusively. Only the name changes, so a blob
// written around the page cache is not read back into it.
func (s *Store) AddBlob(d digest.Digest, file string) error {
	dst := s.blobPath(d)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if err := os.Chmod(file, 0o444); err != nil {
		return err
	}
	if err := os.Rename(file, dst); err != nil {
		return err
	}
	// The name too survives a crash, as the content store's commit
	// makes sure.
	dir, err := os.Open(filepath.Dir(dst))
	if err != nil {
		return err
	}
	defer dir.Close()
	return dir.Sync()
}

// NewWorkDir creates a private scratch directory for one build.
func (s *Store) NewWorkDir() (*workdir.Dir, error) {
	return workdir.New(filepath.Join(s.root, "tmp"))
}
