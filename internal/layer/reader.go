// Package layer reads OCI and Docker layer blobs: it decompresses gzip,
// zstd or plain tar in the background, so that decompression overlaps with
// whatever consumes the tar, and verifies both the blob digest and the
// diffID of what it produced.
package layer

import (
	"bufio"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/chunk"
	"github.com/kilnfs/kiln/internal/readahead"
)

// Docker's layer media types, which OCI image-spec does not define.
const (
	MediaTypeDockerLayer        = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	MediaTypeDockerForeignLayer = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
	MediaTypeDockerLayerPlain   = "application/vnd.docker.image.rootfs.diff.tar"
)

// mediaTypes maps each layer media type kiln reads to the compression it
// says the blob has.
var mediaTypes = map[string]Compression{
	ocispec.MediaTypeImageLayer:     Plain,
	ocispec.MediaTypeImageLayerGzip: Gzip,
	ocispec.MediaTypeImageLayerZstd: Zstd,
	//nolint:staticcheck // non-distributable layers still appear in images
	ocispec.MediaTypeImageLayerNonDistributable: Plain,
	//nolint:staticcheck
	ocispec.MediaTypeImageLayerNonDistributableGzip: Gzip,
	//nolint:staticcheck
	ocispec.MediaTypeImageLayerNonDistributableZstd: Zstd,
	MediaTypeDockerLayer:                            Gzip,
	MediaTypeDockerForeignLayer:                     Gzip,
	MediaTypeDockerLayerPlain:                       Plain,
}

// ErrUnknownMediaType is wrapped for layers kiln cannot read.
var ErrUnknownMediaType = errors.New("unknown layer media type")

// CheckMediaType fails for media types that are not tar layers.
func CheckMediaType(mediaType string) error {
	if _, ok := mediaTypes[mediaType]; !ok {
		return fmt.Errorf("%w %q", ErrUnknownMediaType, mediaType)
	}
	return nil
}

// Error is a problem with a layer's bytes: a digest mismatch or data that
// does not decompress.
type Error struct {
	Digest digest.Digest
	Err    error
}

func (e *Error) Error() string { return fmt.Sprintf("layer %s: %v", e.Digest, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// ErrDigestMismatch is wrapped when a blob or its content is not what the
// manifest or config says.
var ErrDigestMismatch = errors.New("digest mismatch")

const chunkSize = 1 << 20

// maxZstdWindow is the largest zstd window kiln decodes.
const maxZstdWindow = 128 << 20

// Reader is the uncompressed tar stream of a layer.
type Reader struct {
	desc    Descriptor
	hashing chan []byte // from the decompressor to the diffID's hasher
	chunks  chan []byte // hashed, to Read
	free    chan []byte
	chunk   []byte // the chunk being read, to hand back to the decompressor
	cur     []byte // what is left of it
	done    chan struct{}
	// diffHash is computed in a goroutine of its own, between the
	// decompressor and the consumer, either of which may be the
	// bottleneck (gzip, or zstd into many small files).
	diffHash hash.Hash
	diffID   digest.Digest // set at the end of the stream
	once     sync.Once

	mu  sync.Mutex
	err error // set by the decompressor when it stops
}

// Descriptor identifies a layer: its blob and what it must decompress to.
type Descriptor struct {
	MediaType string
	Digest    digest.Digest // of the blob as stored; empty: not checked
	DiffID    digest.Digest // of the uncompressed tar; empty: computed, not checked
	// Verified says the blob's digest was checked where it is read
	// from (containerd's content store checks each blob it takes in):
	// Digest then only names the layer in errors.
	Verified bool
}

// NewReader starts decompressing blob, compressed as DetectCompression
// decides; the media type must be a known layer type. Read returns io.EOF
// only after the whole blob was read and both digests matched.
func NewReader(blob io.Reader, desc Descriptor) (*Reader, error) {
	if err := CheckMediaType(desc.MediaType); err != nil {
		return nil, &Error{Digest: desc.Digest, Err: err}
	}
	if desc.Digest != "" {
		if err := desc.Digest.Validate(); err != nil {
			return nil, &Error{Digest: desc.Digest, Err: fmt.Errorf("invalid digest: %w", err)}
		}
	}
	if desc.DiffID != "" {
		if err := desc.DiffID.Validate(); err != nil {
			return nil, &Error{Digest: desc.Digest, Err: fmt.Errorf("invalid diffID %q: %w", desc.DiffID, err)}
		}
	}
	r := &Reader{
		desc:    desc,
		hashing: make(chan []byte, 1),
		chunks:  make(chan []byte, 4),
		free:    make(chan []byte, 6),
		done:    make(chan struct{}),
	}
	if desc.DiffID != "" {
		r.diffHash = desc.DiffID.Algorithm().Hash()
	} else {
		r.diffHash = digest.Canonical.Hash()
	}
	go r.decompress(blob)
	go r.hash()
	return r, nil
}

func (r *Reader) decompress(blob io.Reader) {
	err := r.pump(blob)
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
	close(r.hashing)
}

// hash adds each chunk to the diffID's hash, then passes it to Read. Once
// the reader is closed it waits for the decompressor to stop, so that
// Close returns only when neither reads the blob.
func (r *Reader) hash() {
	defer close(r.chunks)
	for c := range r.hashing {
		r.diffHash.Write(c)
		select {
		case r.chunks <- c:
		case <-r.done:
			for range r.hashing {
			}
			return
		}
	}
}

func (r *Reader) pump(blob io.Reader) error {
	// Reading the blob (from a registry, through the cache) and hashing
	// it run in a goroutine of their own, beside decompression, which is
	// the bottleneck.
	check := r.desc.Digest
	if r.desc.Verified {
		check = ""
	}
	var blobHash hash.Hash
	if check != "" {
		blobHash = check.Algorithm().Hash()
	}
	ahead := readahead.New(blob, blobHash)
	defer ahead.Stop()
	blob = ahead
	in := bufio.NewReaderSize(blob, chunkSize)
	// rest reads the blob to its end, where its digest is checked.
	rest := func() error {
		// Whatever follows the compressed stream is part of the blob too.
		if _, err := io.Copy(io.Discard, in); err != nil {
			return fmt.Errorf("reading blob: %w", err)
		}
		if check == "" {
			return nil
		}
		if got := digest.NewDigest(check.Algorithm(), blobHash); got != r.desc.Digest {
			return fmt.Errorf("%w: blob digest is %s", ErrDigestMismatch, got)
		}
		return nil
	}
	// A blob that is not what its digest says may fail to decompress
	// before its end: the mismatch is the cause then.
	cause := func(err error) error {
		if rerr := rest(); errors.Is(rerr, ErrDigestMismatch) {
			return rerr
		}
		return err
	}
	src, err := openTar(in, r.desc.MediaType)
	if err != nil {
		return cause(err)
	}
	defer src.Close()
	for {
		var buf []byte
		select {
		case buf = <-r.free:
		default:
			buf = make([]byte, chunkSize)
		}
		n, err := chunk.Fill(src, buf)
		if n > 0 {
			select {
			case r.hashing <- buf[:n]:
			case <-r.done:
				return errors.New("layer reader closed")
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			if err == io.ErrUnexpectedEOF {
				err = errors.New("unexpected end of data: the blob is truncated or corrupt")
			}
			if errors.Is(err, zstd.ErrWindowSizeExceeded) {
				err = fmt.Errorf("zstd %w: kiln decodes windows of up to %d MiB", err, maxZstdWindow>>20)
			}
			return cause(fmt.Errorf("decompressing: %w", err))
		}
	}
	return rest()
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	for len(r.cur) == 0 {
		if r.chunk != nil {
			select {
			case r.free <- r.chunk[:cap(r.chunk)]:
			default:
			}
			r.chunk, r.cur = nil, nil
		}
		c, ok := <-r.chunks
		if !ok {
			r.mu.Lock()
			err := r.err
			r.mu.Unlock()
			if err != nil {
				// The blob's own reader may have said what is wrong
				// with it (the cache checks what it fetches).
				var inner *Error
				if errors.As(err, &inner) && inner.Digest == r.desc.Digest {
					return 0, inner
				}
				return 0, &Error{Digest: r.desc.Digest, Err: err}
			}
			alg := digest.Canonical
			if r.desc.DiffID != "" {
				alg = r.desc.DiffID.Algorithm()
			}
			got := digest.NewDigest(alg, r.diffHash)
			if r.desc.DiffID != "" && got != r.desc.DiffID {
				return 0, &Error{Digest: r.desc.Digest, Err: fmt.Errorf(
					"%w: uncompressed content is %s, diffID says %s", ErrDigestMismatch, got, r.desc.DiffID)}
			}
			r.diffID = got
			return 0, io.EOF
		}
		r.chunk, r.cur = c, c
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

// DiffID returns the digest of the uncompressed stream once it was read to
// the end, whether or not the descriptor said what it must be.
func (r *Reader) DiffID() digest.Digest { return r.diffID }

// Finish reads what the consumer left (a tar reader stops at the end
// marker, before the padding) and reports whether the layer verified.
func (r *Reader) Finish() error {
	_, err := io.Copy(io.Discard, r)
	return err
}

// Cause explains why consuming a layer failed. A blob that is not what its
// digest says can make the tar look broken or hostile before the digest is
// checked at the end; then the digest mismatch is the cause, so Cause reads
// the rest of the blob to find out. Errors of the blob itself (corrupt
// data, a digest mismatch) are reported as they are.
func Cause(err error, r *Reader) error {
	var lerr *Error
	if errors.As(err, &lerr) {
		return lerr
	}
	if ferr := r.Finish(); errors.As(ferr, &lerr) && errors.Is(ferr, ErrDigestMismatch) {
		return lerr
	}
	return err
}

// Close stops the decompressor. It does not close the blob.
func (r *Reader) Close() error {
	r.once.Do(func() { close(r.done) })
	for range r.chunks {
	}
	return nil
}
