package share

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/chunked"
	"github.com/kilnfs/kiln/internal/image"
)

// AnnotationChunkSize is a chunked rootfs's chunk size.
const AnnotationChunkSize = "dev.kiln.rootfs.chunk-size"

// PublishChunked uploads the rootfs file, built as id from the image
// whose manifest digest is manifest, as a chunked artifact (see package
// chunked) whose subject is that manifest: the index first, then the
// packs. workDir holds the packs while they are uploaded.
func PublishChunked(ctx context.Context, t image.Target, manifest digest.Digest, rootfs string, id build.Identity, chunkSize int64, workDir string) (v1.Hash, error) {
	if err := checkPush(ctx, t); err != nil {
		return v1.Hash{}, err
	}
	f, err := os.Open(rootfs)
	if err != nil {
		return v1.Hash{}, err
	}
	defer f.Close()
	x, packs, err := chunked.Cut(ctx, f, workDir, chunkSize, chunked.DefaultPackSize)
	for _, p := range packs {
		defer os.Remove(p.Path)
	}
	if err != nil {
		return v1.Hash{}, fmt.Errorf("cutting %s into chunks: %w", rootfs, err)
	}
	raw, err := json.Marshal(x)
	if err != nil {
		return v1.Hash{}, err
	}
	index := filepath.Join(workDir, "index.json")
	if err := os.WriteFile(index, raw, 0o600); err != nil {
		return v1.Hash{}, err
	}
	defer os.Remove(index)
	blobs := []fileBlob{{index, digest.FromBytes(raw), int64(len(raw)), chunked.IndexMediaType}}
	for _, p := range packs {
		blobs = append(blobs, fileBlob{p.Path, p.Digest, p.Size, chunked.PackMediaType})
	}
	ann, err := imageAnnotations(rootfs, id, x.Size, x.Digest)
	if err != nil {
		return v1.Hash{}, err
	}
	ann[AnnotationChunkSize] = strconv.FormatInt(chunkSize, 10)
	return putArtifact(ctx, t, manifest, chunked.ArtifactType, blobs, ann)
}

// Chunked is a chunked rootfs found in a registry.
type Chunked struct {
	Artifact v1.Hash
	Index    *chunked.Index
	// RootHash is the verity root hash the artifact says, for a verity
	// build.
	RootHash string
	Fetcher  chunked.Fetcher
}

// FindChunked looks among the referrers of the image manifest in t (the
// registry itself) for a chunked rootfs of the build id and returns the
// first whose index checks: that it describes an image of the size and
// digest the artifact says, no larger than maxSize, in the packs it
// lists. The chunks themselves are checked as they are read.
func FindChunked(ctx context.Context, t image.Target, manifest digest.Digest, id build.Identity, maxSize int64) (*Chunked, error) {
	repo := t.Ref.Context()
	idx, err := remote.Referrers(repo.Digest(manifest.String()), t.Options...)
	if err != nil {
		return nil, fmt.Errorf("listing the referrers of %s in %s: %w", manifest, repo, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("referrers of %s in %s: %w", manifest, repo, err)
	}
	var reasons []string
	tries := 0
	for _, d := range im.Manifests {
		if !candidate(d, id, chunked.ArtifactType) {
			continue
		}
		if tries++; tries > maxTries {
			break
		}
		c, err := findOne(ctx, t, repo, d.Digest, id, maxSize)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{"repository": repo.String(), "artifact": d.Digest.String()}).Warn("not using a published chunked rootfs")
		reasons = append(reasons, fmt.Sprintf("%s: %v", d.Digest, err))
	}
	if len(reasons) == 0 {
		return nil, fmt.Errorf("%s in %s has no chunked rootfs of this build (key %s) published beside it: %w", manifest, repo, id.Key, ErrNotPublished)
	}
	return nil, fmt.Errorf("no chunked rootfs of %s in %s verifies: %s: %w", manifest, repo, strings.Join(reasons, "; "), ErrNotPublished)
}

// ErrNotPublished is wrapped when a registry has no usable rootfs of a
// build.
var ErrNotPublished = errors.New("not published")

func findOne(ctx context.Context, t image.Target, repo name.Repository, artifact v1.Hash, id build.Identity, maxSize int64) (*Chunked, error) {
	// Bounded before anything is read: the image's size, and an index
	// no larger than one of its chunks needs.
	m, size, err := artifactManifest(repo, t.Options, artifact, chunked.ArtifactType, chunked.IndexMediaType, id, maxSize)
	if err != nil {
		return nil, err
	}
	chunkSize, err := strconv.ParseInt(m.Annotations[AnnotationChunkSize], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%s %q", AnnotationChunkSize, m.Annotations[AnnotationChunkSize])
	}
	if s := m.Layers[0].Size; s <= 0 || s > chunked.MaxIndexSize(size, chunkSize) {
		return nil, fmt.Errorf("a chunk index of %d bytes for an image of %d bytes in chunks of %d", s, size, chunkSize)
	}
	l, err := remote.Layer(repo.Digest(m.Layers[0].Digest.String()), t.Options...)
	if err != nil {
		return nil, err
	}
	rc, err := l.Compressed() // checks the digest as it ends
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	raw, err := io.ReadAll(&exactReader{r: ctxReader{ctx, rc}, left: m.Layers[0].Size})
	if err != nil {
		return nil, fmt.Errorf("chunk index: %w", err)
	}
	var x chunked.Index
	if err := json.Unmarshal(raw, &x); err != nil {
		return nil, fmt.Errorf("chunk index: %w", err)
	}
	if err := x.Validate(); err != nil {
		return nil, fmt.Errorf("chunk index: %w", err)
	}
	if x.Size != size || x.ChunkSize != chunkSize || x.Digest.String() != m.Annotations[AnnotationImageDigest] {
		return nil, fmt.Errorf("the index describes an image of %d bytes, %s; the artifact says %s bytes, %s",
			x.Size, x.Digest, m.Annotations[AnnotationImageSize], m.Annotations[AnnotationImageDigest])
	}
	if len(x.Packs) != len(m.Layers)-1 {
		return nil, fmt.Errorf("the index lists %d packs, the artifact %d", len(x.Packs), len(m.Layers)-1)
	}
	for i, p := range x.Packs {
		if l := m.Layers[i+1]; l.MediaType != chunked.PackMediaType || l.Digest != p.Digest || l.Size != p.Size {
			return nil, fmt.Errorf("pack %d is %s (%d bytes) in the index, %s (%d bytes, %s) in the artifact", i, p.Digest, p.Size, l.Digest, l.Size, l.MediaType)
		}
	}
	client, err := t.Client(ctx, transport.PullScope)
	if err != nil {
		return nil, err
	}
	return &Chunked{
		Artifact: artifact, Index: &x, RootHash: m.Annotations[AnnotationRootHash],
		Fetcher: &rangeFetcher{client: client, base: image.BlobsURL(repo)},
	}, nil
}

// rangeFetcher reads frames from pack blobs with HTTP range requests.
type rangeFetcher struct {
	client *http.Client
	base   string
	warned sync.Once
}

func (f *rangeFetcher) Fetch(ctx context.Context, pack chunked.Pack, off int64, p []byte) error {
	n := int64(len(p))
	if off < 0 || n <= 0 || off+n > pack.Size {
		return fmt.Errorf("range %d+%d of a pack of %d bytes", off, n, pack.Size)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.base+pack.Digest.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := f.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		// No range support: skip to the frame.
		f.warned.Do(func() {
			log.G(ctx).WithField("blob", pack.Digest.String()).Warn("the registry ignores range requests: every read downloads its pack from the start")
		})
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return fmt.Errorf("pack %s: %w", pack.Digest, err)
		}
	default:
		return fmt.Errorf("pack %s: %s", pack.Digest, resp.Status)
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fmt.Errorf("pack %s, bytes %d-%d: %w", pack.Digest, off, off+n-1, err)
	}
	return nil
}
