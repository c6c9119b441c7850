// Package share publishes built root filesystems beside their images in
// the registry, and fetches them instead of building. A build is
// reproducible: the same layers and options give the same bytes on any
// machine, so one machine's build serves a fleet.
//
// A published rootfs is an OCI artifact (image-spec 1.1) whose subject is
// the image's manifest: one zstd blob holding the ext4 image, and
// annotations saying which build it is (kiln's format version, the chain
// ID, the options that change bytes, the build key) and what the image
// must hash to. Registries find it through the referrers API, or the
// referrers tag schema where they have none (go-containerregistry does
// both). A fetched image is checked against the blob's digest, its own
// size and digest and the build key before it is used; anything else is
// ignored and kiln builds as before.
package share

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/chunk"
	"github.com/kilnfs/kiln/internal/chunked"
	"github.com/kilnfs/kiln/internal/directio"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/readahead"
	"github.com/kilnfs/kiln/internal/verity"
)

// The artifact's types.
const (
	ArtifactType  = "application/vnd.kiln.rootfs.v1"
	BlobMediaType = "application/vnd.kiln.rootfs.ext4.v1+zstd"
)

// Annotations of a published rootfs.
const (
	AnnotationFormat  = "dev.kiln.rootfs.format"
	AnnotationKey     = "dev.kiln.rootfs.key"
	AnnotationChainID = "dev.kiln.rootfs.chain-id"
	AnnotationSize    = "dev.kiln.rootfs.build.size"
	AnnotationWriter  = "dev.kiln.rootfs.build.writer"
	AnnotationInject  = "dev.kiln.rootfs.build.inject"
	AnnotationVerity  = "dev.kiln.rootfs.build.verity"
	// AnnotationRootHash is the dm-verity root hash of an image built
	// with a hash tree: what a VMM or shim gives the kernel.
	AnnotationRootHash = "dev.kiln.rootfs.verity.root-hash"
	// AnnotationImageSize and AnnotationImageDigest are the ext4 image's
	// own size and sha256, uncompressed.
	AnnotationImageSize   = "dev.kiln.rootfs.image.size"
	AnnotationImageDigest = "dev.kiln.rootfs.image.digest"
)

func annotations(id build.Identity, size int64, d digest.Digest) map[string]string {
	return map[string]string{
		AnnotationFormat:      id.Format,
		AnnotationKey:         id.Key,
		AnnotationChainID:     id.ChainID.String(),
		AnnotationSize:        strconv.FormatInt(id.Size, 10),
		AnnotationWriter:      id.Writer,
		AnnotationInject:      id.Inject,
		AnnotationVerity:      strconv.FormatBool(id.Verity),
		AnnotationImageSize:   strconv.FormatInt(size, 10),
		AnnotationImageDigest: d.String(),
	}
}

// matches says whether a published rootfs is the build id: every
// annotation that says what was built must be what kiln would build.
func matches(ann map[string]string, id build.Identity) error {
	want := annotations(id, 0, "")
	for _, k := range []string{AnnotationFormat, AnnotationKey, AnnotationChainID, AnnotationSize, AnnotationWriter, AnnotationInject, AnnotationVerity} {
		if ann[k] != want[k] {
			return fmt.Errorf("%s is %q, this build's is %q", k, ann[k], want[k])
		}
	}
	return nil
}

// Publish uploads the rootfs file, built as id from the image whose
// manifest digest is manifest, to the repository of t, as an artifact
// whose subject is that manifest. workDir holds the compressed blob while
// it is uploaded. It returns the artifact's manifest digest.
func Publish(ctx context.Context, t image.Target, manifest digest.Digest, rootfs string, id build.Identity, workDir string) (v1.Hash, error) {
	if err := checkPush(ctx, t); err != nil {
		return v1.Hash{}, err
	}
	blob, err := compress(ctx, rootfs, filepath.Join(workDir, "rootfs.ext4.zst"))
	if err != nil {
		return v1.Hash{}, err
	}
	defer os.Remove(blob.path)
	ann, err := imageAnnotations(rootfs, id, blob.imageSize, blob.imageDigest)
	if err != nil {
		return v1.Hash{}, err
	}
	return putArtifact(ctx, t, manifest, ArtifactType, []fileBlob{{blob.path, blob.digest, blob.size, BlobMediaType}}, ann)
}

// checkPush starts an upload to t's repository and cancels it, so that
// credentials that may not push fail before the rootfs is compressed (a
// whole pass over it, for nothing) rather than at its upload. Only a
// refusal fails it: anything else (a registry busy for a moment, an odd
// answer) is left to the upload, which retries.
func checkPush(ctx context.Context, t image.Target) error {
	repo := t.Ref.Context()
	client, err := t.Client(ctx, transport.PushScope)
	if err != nil {
		return fmt.Errorf("pushing to %s: %w", repo, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, image.BlobsURL(repo)+"uploads/", nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		log.G(ctx).WithError(err).WithField("repository", repo.String()).Debug("could not check that pushing is allowed; trying the upload")
		return nil
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusAccepted, http.StatusCreated); err != nil {
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
			return fmt.Errorf("pushing to %s: %w", repo, err)
		}
		log.G(ctx).WithError(err).WithField("repository", repo.String()).Debug("could not check that pushing is allowed; trying the upload")
		return nil
	}
	cancelUpload(ctx, client, resp)
	return nil
}

// cancelUpload cancels the upload resp started, as go-containerregistry's
// own check does, in case it holds something on the registry: best
// effort, briefly, and only on the registry's own host, whatever its
// answer names.
func cancelUpload(ctx context.Context, client *http.Client, resp *http.Response) {
	loc, err := resp.Location()
	if err != nil || loc.Host != resp.Request.URL.Host {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	del, err := http.NewRequestWithContext(ctx, http.MethodDelete, loc.String(), nil)
	if err != nil {
		return
	}
	noRedirects := *client
	noRedirects.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	if r, err := noRedirects.Do(del); err == nil {
		r.Body.Close()
	}
}

// imageAnnotations are the annotations of a published rootfs of size
// bytes and digest d: the build's and, for a verity build, its root hash.
func imageAnnotations(rootfs string, id build.Identity, size int64, d digest.Digest) (map[string]string, error) {
	ann := annotations(id, size, d)
	if id.Verity {
		info, err := verity.Describe(rootfs)
		if err != nil {
			return nil, err
		}
		ann[AnnotationRootHash] = info.RootHash
	}
	return ann, nil
}

// putArtifact uploads blobs and an artifact manifest listing them, whose
// subject is the image manifest, to the repository of t.
func putArtifact(ctx context.Context, t image.Target, manifest digest.Digest, artifactType string, blobs []fileBlob, ann map[string]string) (v1.Hash, error) {
	repo := t.Ref.Context()
	subject, err := remote.Head(repo.Digest(manifest.String()), t.Options...)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("the image's manifest %s in %s: %w", manifest, repo, err)
	}
	uploads := []v1.Layer{static(ocispec.DescriptorEmptyJSON.MediaType, ocispec.DescriptorEmptyJSON.Data)}
	var layers []ocispec.Descriptor
	for _, b := range blobs {
		uploads = append(uploads, b)
		layers = append(layers, b.descriptor())
	}
	for _, l := range uploads {
		if err := ctx.Err(); err != nil {
			return v1.Hash{}, err
		}
		if err := remote.WriteLayer(repo, l, t.Options...); err != nil {
			return v1.Hash{}, fmt.Errorf("uploading to %s: %w", repo, err)
		}
	}
	m := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: artifactType,
		Config:       ocispec.DescriptorEmptyJSON,
		Layers:       layers,
		Subject: &ocispec.Descriptor{
			MediaType: string(subject.MediaType), Digest: digest.Digest(subject.Digest.String()), Size: subject.Size,
		},
		Annotations: ann,
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return v1.Hash{}, err
	}
	h, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return v1.Hash{}, err
	}
	if err := remote.Put(repo.Digest(h.String()), rawManifest(raw), t.Options...); err != nil {
		return v1.Hash{}, fmt.Errorf("publishing to %s: %w", repo, err)
	}
	log.G(ctx).WithFields(log.Fields{"repository": repo.String(), "artifact": h.String(), "type": artifactType, "key": ann[AnnotationKey]}).Info("published the rootfs")
	return h, nil
}

// MaxImageSize bounds the image a published artifact may make kiln
// write: what a build with these options could make (the size asked
// for, or room for the image_bytes limit), and without either no more
// than the disk under dir has free. An artifact claiming more is not
// downloaded.
func MaxImageSize(opts build.Options, dir string) int64 {
	switch {
	case opts.Size > 0:
		return opts.Size + opts.Size/64 + 1<<20 // and a verity tree
	case opts.Limits.ImageBytes > 0:
		return 2*opts.Limits.ImageBytes + 1<<30
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

// maxTries bounds the artifacts Fetch downloads for one image: a
// registry can list any number of referrers.
const maxTries = 3

// Fetch looks among the referrers of the image manifest in t (the
// registry itself: a mirror's referrers are not bound to the image it
// serves) for a published rootfs of the build id, and writes the first
// that verifies into out, an empty file open for reading and writing,
// as it downloads. maxSize bounds the image it will write. It reports
// whether it found one; what it finds and cannot use is logged with the
// reason and skipped, and out is left empty. Errors of this machine (no
// space, cancellation) end it. out is not synced.
func Fetch(ctx context.Context, t image.Target, manifest digest.Digest, id build.Identity, out *os.File, maxSize int64) (bool, error) {
	repo := t.Ref.Context()
	idx, err := remote.Referrers(repo.Digest(manifest.String()), t.Options...)
	if err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		log.G(ctx).WithError(err).WithField("repository", repo.String()).Warn("cannot list the image's referrers; building it")
		return false, nil
	}
	im, err := idx.IndexManifest()
	if err != nil {
		log.G(ctx).WithError(err).WithField("repository", repo.String()).Warn("unreadable referrers; building the image")
		return false, nil
	}
	seen := map[v1.Hash]bool{}
	tries := 0
	for _, d := range im.Manifests {
		if !candidate(d, id, ArtifactType) || seen[d.Digest] {
			continue
		}
		seen[d.Digest] = true
		if tries++; tries > maxTries {
			log.G(ctx).WithField("repository", repo.String()).Warnf("the image has more than %d candidate rootfs artifacts; building it", maxTries)
			return false, nil
		}
		err := fetchOne(ctx, repo, t.Options, d.Digest, id, out, maxSize)
		if err == nil {
			return true, nil
		}
		if terr := out.Truncate(0); terr != nil {
			return false, terr
		}
		var local *localError
		if ctx.Err() != nil {
			return false, ctx.Err()
		} else if errors.As(err, &local) {
			return false, err
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{"repository": repo.String(), "artifact": d.Digest.String()}).Warn("not using a published rootfs")
	}
	return false, nil
}

// localError is a failure of this machine, not of the artifact.
type localError struct{ err error }

func (e *localError) Error() string { return e.err.Error() }
func (e *localError) Unwrap() error { return e.err }

// candidate says whether a referrer may be a published rootfs of build
// id of the given artifact type (ArtifactType or chunked.ArtifactType).
// Its artifact type should say so, but registries that predate the
// field, or take it from the config's media type, give the empty
// config's or none; the referrers list carries the annotations, which
// rule out other builds, and the other form, without a download. The
// manifest, fetched by digest, decides.
func candidate(d v1.Descriptor, id build.Identity, artifactType string) bool {
	switch d.ArtifactType {
	case artifactType, "", ocispec.MediaTypeEmptyJSON:
	default:
		return false
	}
	if k, ok := d.Annotations[AnnotationKey]; ok && k != id.Key {
		return false
	}
	if _, cut := d.Annotations[AnnotationChunkSize]; len(d.Annotations) > 0 && cut != (artifactType == chunked.ArtifactType) {
		return false
	}
	return true
}

// fetchOne downloads one published rootfs and checks that it is the build
// id: its manifest (fetched by digest) must say so, its blob must match
// its digest, and the image its size and digest.
func fetchOne(ctx context.Context, repo name.Repository, opts []remote.Option, artifact v1.Hash, id build.Identity, out *os.File, maxSize int64) error {
	m, size, err := artifactManifest(repo, opts, artifact, ArtifactType, BlobMediaType, id, maxSize)
	if err != nil {
		return err
	}
	if len(m.Layers) != 1 {
		return fmt.Errorf("not a kiln rootfs (%d blobs)", len(m.Layers))
	}
	// zstd does not grow what it cannot compress by more than a little.
	blobSize := m.Layers[0].Size
	if blobSize <= 0 || blobSize > size+size/64+(1<<20) {
		return fmt.Errorf("a blob of %d bytes for an image of %d", blobSize, size)
	}
	want, err := digest.Parse(m.Annotations[AnnotationImageDigest])
	if err != nil {
		return fmt.Errorf("%s: %w", AnnotationImageDigest, err)
	}
	l, err := remote.Layer(repo.Digest(m.Layers[0].Digest.String()), opts...)
	if err != nil {
		return err
	}
	rc, err := l.Compressed() // checks the blob's digest as it ends
	if err != nil {
		return err
	}
	// Received (and its digest computed) on a CPU of its own, ahead of
	// the decompressor.
	blob := readahead.New(&exactReader{r: ctxReader{ctx, rc}, left: blobSize}, nil)
	defer func() {
		rc.Close() // first: it ends a read the goroutine may wait in
		blob.Stop()
	}()
	// Written around the page cache, unless the check below is to read
	// it all back at once.
	got, err := expand(ctx, blob, out, size, !id.Verity)
	if err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, blob); err != nil { // to its end, and its digest
		return err
	}
	if got != want {
		return fmt.Errorf("the image's digest is %s, the artifact says %s", got, want)
	}
	if id.Verity {
		// The digest says the image arrived as published; this says its
		// tree is the one kiln writes and covers its data.
		if err := verity.Check(out, id.Key, m.Annotations[AnnotationRootHash]); err != nil {
			return fmt.Errorf("the image against its dm-verity root hash %q: %w", m.Annotations[AnnotationRootHash], err)
		}
	}
	return nil
}

// artifactManifest fetches an artifact's manifest by digest and checks
// that it is a kiln rootfs of artifactType, its first blob of media type
// first, of the build id, and of an image no larger than maxSize, which
// it returns.
func artifactManifest(repo name.Repository, opts []remote.Option, artifact v1.Hash, artifactType, first string, id build.Identity, maxSize int64) (*ocispec.Manifest, int64, error) {
	desc, err := remote.Get(repo.Digest(artifact.String()), opts...)
	if err != nil {
		return nil, 0, err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		return nil, 0, fmt.Errorf("manifest: %w", err)
	}
	if m.ArtifactType != artifactType || len(m.Layers) < 1 || m.Layers[0].MediaType != first {
		return nil, 0, fmt.Errorf("not a kiln rootfs of type %s (artifact type %q)", artifactType, m.ArtifactType)
	}
	if err := matches(m.Annotations, id); err != nil {
		return nil, 0, err
	}
	size, err := strconv.ParseInt(m.Annotations[AnnotationImageSize], 10, 64)
	if err != nil || size <= 0 {
		return nil, 0, fmt.Errorf("%s %q", AnnotationImageSize, m.Annotations[AnnotationImageSize])
	}
	if size > maxSize {
		return nil, 0, fmt.Errorf("the image would be %d bytes, more than this build may make (%d)", size, maxSize)
	}
	return &m, size, nil
}

// compressed is the rootfs as it is uploaded.
type compressed struct {
	path        string
	digest      digest.Digest
	size        int64
	imageDigest digest.Digest
	imageSize   int64
}

// compress writes rootfs to path in zstd, hashing both forms.
func compress(ctx context.Context, rootfs, path string) (*compressed, error) {
	in, err := os.Open(rootfs)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	c := &compressed{path: path}
	ok := false
	defer func() {
		f.Close()
		if !ok {
			os.Remove(path)
		}
	}()
	zh := sha256.New()
	enc, err := zstd.NewWriter(io.MultiWriter(f, zh), zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		return nil, err
	}
	ih := sha256.New()
	n, err := io.Copy(io.MultiWriter(enc, ih), ctxReader{ctx, in})
	if err != nil {
		enc.Close()
		return nil, fmt.Errorf("compressing %s: %w", rootfs, err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("compressing %s: %w", rootfs, err)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	c.digest, c.size = digestOf(zh), fi.Size()
	c.imageDigest, c.imageSize = digestOf(ih), n
	ok = true
	return c, nil
}

// expand decompresses a published image into f as it downloads,
// leaving whole zero blocks as holes, and returns its digest; it must be
// size bytes long. The blocks are hashed and written (with direct set,
// around the page cache: see directio) while the next ones decompress.
func expand(ctx context.Context, r io.Reader, f *os.File, size int64, direct bool) (_ digest.Digest, err error) {
	// A small window, as kiln writes them: a frame asking for more is
	// refused rather than given the memory. Four blocks in flight between
	// the decoder's stages keep both of a small node's CPUs busy.
	dec, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(32<<20), zstd.WithDecoderConcurrency(4), zstd.WithDecoderLowmem(true))
	if err != nil {
		return "", err
	}
	defer dec.Close()
	const buffers, bufSize = 6, 1 << 20
	free := make(chan []byte, buffers)
	for range buffers {
		free <- directio.Buffer(bufSize)
	}
	h := newHasher(buffers)
	w := directio.New(f, 4, direct)
	defer func() {
		h.stop()
		if werr := w.Close(); werr != nil && err == nil {
			err = &localError{werr}
		}
	}()
	// Sized first: the runs then fill holes of the file rather than
	// extend it, which some file systems let go on at the same time.
	if err := f.Truncate(size); err != nil {
		return "", &localError{err}
	}
	var zero [directio.Align]byte
	var off int64
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		buf := <-free
		n, rerr := chunk.Fill(dec, buf)
		if off+int64(n) > size {
			return "", fmt.Errorf("the image is longer than the %d bytes the artifact says", size)
		}
		// The buffer is free again once it is hashed and each of its
		// runs written.
		var pending sync.WaitGroup
		pending.Add(1)
		h.add(buf[:n], pending.Done)
		// Each stretch of blocks that are not all zeros in one write.
		for b := 0; b < n; {
			e := min(b+len(zero), n)
			if bytes.Equal(buf[b:e], zero[:e-b]) {
				b = e
				continue
			}
			for e < n && !bytes.Equal(buf[e:min(e+len(zero), n)], zero[:min(e+len(zero), n)-e]) {
				e = min(e+len(zero), n)
			}
			if tail := e % len(zero); tail != 0 {
				// The image's last block, short: padded with zeros to
				// a whole one, so that it too is written direct (never
				// through the cache beside direct writes of the same
				// page); the Truncate below cuts the padding off.
				clear(buf[e : e+len(zero)-tail])
				e += len(zero) - tail
			}
			pending.Add(1)
			if err := w.WriteAt(buf[b:e], off+int64(b), pending.Done); err != nil {
				return "", &localError{err}
			}
			b = e
		}
		go func() {
			pending.Wait()
			free <- buf[:cap(buf)]
		}()
		off += int64(n)
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return "", fmt.Errorf("decompressing: %w", rerr)
		}
	}
	if off != size {
		return "", fmt.Errorf("the image is %d bytes, the artifact says %d", off, size)
	}
	if err := w.Close(); err != nil {
		return "", &localError{err}
	}
	if err := f.Truncate(size); err != nil {
		return "", &localError{err}
	}
	return h.sum(), nil
}

// hasher hashes buffers in the background, on another CPU, while the
// caller writes them.
type hasher struct {
	h    hash.Hash
	in   chan hashJob
	done chan struct{}
	once sync.Once
}

type hashJob struct {
	b    []byte
	done func()
}

func newHasher(queue int) *hasher {
	h := &hasher{h: sha256.New(), in: make(chan hashJob, queue), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		for j := range h.in {
			h.h.Write(j.b)
			j.done()
		}
	}()
	return h
}

// add hashes b next, and calls done once it has; b must not change
// until then.
func (h *hasher) add(b []byte, done func()) { h.in <- hashJob{b, done} }

// sum is the digest of all that was added.
func (h *hasher) sum() digest.Digest {
	h.stop()
	return digestOf(h.h)
}

func (h *hasher) stop() {
	h.once.Do(func() { close(h.in) })
	<-h.done
}

// exactReader passes exactly left bytes of r: the blob the manifest
// sized. A registry that sends more, or less, is caught here rather
// than trusted to end.
type exactReader struct {
	r    io.Reader
	left int64
}

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left <= 0 {
		// Read on to the end: that is where the blob's digest is checked.
		var one [1]byte
		for {
			n, err := e.r.Read(one[:])
			if n > 0 {
				return 0, errors.New("the blob is longer than its manifest says")
			}
			if err != nil {
				return 0, err
			}
		}
	}
	if int64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		return n, fmt.Errorf("the blob is shorter than its manifest says: %w", io.ErrUnexpectedEOF)
	}
	return n, err
}

func digestOf(h hash.Hash) digest.Digest { return digest.NewDigest(digest.SHA256, h) }

// rawManifest is a manifest to put as it is.
type rawManifest []byte

func (m rawManifest) RawManifest() ([]byte, error)        { return m, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
