package chunked

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Fetcher reads frames from packs: n bytes at off of the pack.
type Fetcher interface {
	Fetch(ctx context.Context, pack Pack, off, n int64) ([]byte, error)
}

// Reader reads an image through its index: a chunk comes from the local
// store, or is fetched, verified against its digest and stored first. A
// chunk that does not verify is never returned.
type Reader struct {
	x       *Index
	fetcher Fetcher
	store   *Store
	timeout time.Duration
	dec     *zstd.Decoder

	mu      sync.Mutex
	flights map[digest.Digest]*flight
	read    map[int]bool // chunks read, for the profile
	profile []int

	fetchedBytes  atomic.Int64
	fetchedChunks atomic.Int64
}

type flight struct {
	done chan struct{}
	data []byte
	err  error
}

// NewReader reads the image x describes. A fetch taking longer than
// timeout (0: a minute) fails.
func NewReader(x *Index, f Fetcher, s *Store, timeout time.Duration) (*Reader, error) {
	if timeout <= 0 {
		timeout = time.Minute
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(uint64(x.ChunkSize)), zstd.WithDecoderMaxWindow(uint64(max(x.ChunkSize, zstd.MinWindowSize))),
		zstd.WithDecoderConcurrency(0))
	if err != nil {
		return nil, err
	}
	return &Reader{x: x, fetcher: f, store: s, timeout: timeout, dec: dec, flights: map[digest.Digest]*flight{}, read: map[int]bool{}}, nil
}

// Close releases the decoder.
func (r *Reader) Close() { r.dec.Close() }

// Size is the image's size.
func (r *Reader) Size() int64 { return r.x.Size }

// Index is the image's index.
func (r *Reader) Index() *Index { return r.x }

// ReadAt reads len(p) bytes at off, less only at the end of the image.
func (r *Reader) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= r.x.Size {
		return 0, nil
	}
	p = p[:min(int64(len(p)), r.x.Size-off)]
	n := 0
	for n < len(p) {
		at := off + int64(n)
		i := int(at / r.x.ChunkSize)
		in := at - int64(i)*r.x.ChunkSize
		want := p[n:min(len(p), n+int(r.x.Len(i)-in))]
		if err := r.readChunk(ctx, i, want, in); err != nil {
			return n, err
		}
		n += len(want)
	}
	return n, nil
}

// readChunk fills p from chunk i at off.
func (r *Reader) readChunk(ctx context.Context, i int, p []byte, off int64) error {
	r.note(i)
	c := r.x.Chunks[i]
	if c.Hole() {
		clear(p)
		return nil
	}
	size := r.x.Len(i)
	if ok, err := r.store.ReadAt(c.Digest, size, p, off); ok || err != nil {
		return err
	}
	b, err := r.fetch(ctx, i)
	if err != nil {
		return err
	}
	copy(p, b[off:])
	return nil
}

func (r *Reader) note(i int) {
	r.mu.Lock()
	if !r.read[i] {
		r.read[i] = true
		r.profile = append(r.profile, i)
	}
	r.mu.Unlock()
}

// fetch gets chunk i from its pack, once however many ask at a time,
// and stores it.
func (r *Reader) fetch(ctx context.Context, i int) ([]byte, error) {
	c := r.x.Chunks[i]
	r.mu.Lock()
	f := r.flights[c.Digest]
	if f == nil {
		f = &flight{done: make(chan struct{})}
		r.flights[c.Digest] = f
		go func() {
			// Not the asker's context: others may wait for it too.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.timeout)
			f.data, f.err = r.fetchOne(fctx, i)
			cancel()
			r.mu.Lock()
			delete(r.flights, c.Digest)
			r.mu.Unlock()
			close(f.done)
		}()
	}
	r.mu.Unlock()
	select {
	case <-f.done:
		return f.data, f.err
	case <-ctx.Done():
		return nil, fmt.Errorf("chunk %d: %w", i, ctx.Err())
	}
}

func (r *Reader) fetchOne(ctx context.Context, i int) ([]byte, error) {
	c := r.x.Chunks[i]
	frame, err := r.fetcher.Fetch(ctx, r.x.Packs[c.Pack], c.Offset, c.Length)
	if err != nil {
		return nil, fmt.Errorf("chunk %d (%s): fetching: %w", i, c.Digest, err)
	}
	if int64(len(frame)) != c.Length {
		return nil, fmt.Errorf("chunk %d (%s): %d bytes fetched, want %d", i, c.Digest, len(frame), c.Length)
	}
	r.fetchedBytes.Add(int64(len(frame)))
	r.fetchedChunks.Add(1)
	b, err := r.dec.DecodeAll(frame, make([]byte, 0, r.x.Len(i)))
	if err != nil {
		return nil, fmt.Errorf("chunk %d (%s): decompressing: %w", i, c.Digest, err)
	}
	if int64(len(b)) != r.x.Len(i) || digest.FromBytes(b) != c.Digest {
		return nil, fmt.Errorf("chunk %d: does not match its digest %s", i, c.Digest)
	}
	if err := r.store.Put(c.Digest, b); err != nil {
		log.G(ctx).WithError(err).WithField("chunk", c.Digest.String()).Warn("caching a chunk")
	}
	return b, nil
}

// Prefetch fetches the chunks in order that the store lacks, with
// workers fetches at a time, until done or ctx ends; it returns the
// first error.
func (r *Reader) Prefetch(ctx context.Context, order []int, workers int) error {
	work := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if _, err := r.fetch(ctx, i); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	seen := map[digest.Digest]bool{}
feed:
	for _, i := range order {
		if i < 0 || i >= len(r.x.Chunks) {
			continue
		}
		c := r.x.Chunks[i]
		if c.Hole() || seen[c.Digest] || r.store.Has(c.Digest) {
			continue
		}
		seen[c.Digest] = true
		select {
		case work <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return ctx.Err()
	}
}

// Stats is what a Reader fetched.
type Stats struct {
	FetchedBytes  int64 `json:"fetched_bytes"` // compressed
	FetchedChunks int64 `json:"fetched_chunks"`
}

// Stats says what the reader fetched so far.
func (r *Reader) Stats() Stats {
	return Stats{FetchedBytes: r.fetchedBytes.Load(), FetchedChunks: r.fetchedChunks.Load()}
}

// Profile lists the chunks read so far, each once, in the order first
// read: what a boot needs first, to prefetch next time.
func (r *Reader) Profile() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.profile...)
}
