package chunked

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Fetcher reads frames from packs: len(p) bytes at off of the pack,
// into p.
type Fetcher interface {
	Fetch(ctx context.Context, pack Pack, off int64, p []byte) error
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

	wg      sync.WaitGroup // fetches under way
	mu      sync.Mutex
	flights map[digest.Digest]*flight
	read    map[int]bool // chunks read, for the profile
	profile []int
	// seqNext is the chunk a sequential read would miss next, window
	// the chunks its next request fetches.
	seqNext int
	window  int
	// ahead holds the first chunks of the windows a sequential read has
	// started beyond the chunk it reads, oldest first: as the read
	// enters one, another starts, so that it never waits for a window
	// started only when it got there.
	ahead []int
	// recent holds the chunks fetched last, in a ring: a sequential read
	// asks for them next, and the store writes around the page cache.
	recent     map[digest.Digest][]byte
	recentRing []digest.Digest
	recentNext int

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
	return &Reader{x: x, fetcher: f, store: s, timeout: timeout, dec: dec, flights: map[digest.Digest]*flight{}, read: map[int]bool{}, seqNext: -1, window: 1,
		recent: map[digest.Digest][]byte{}, recentRing: make([]digest.Digest, max(recentBytes/x.ChunkSize, maxAhead+1))}, nil
}

// Close waits for the fetches under way (each ends within the timeout)
// and releases the decoder. No read may be in progress.
func (r *Reader) Close() {
	r.wg.Wait()
	r.dec.Close()
}

// Size is the image's size.
func (r *Reader) Size() int64 { return r.x.Size }

// Index is the image's index.
func (r *Reader) Index() *Index { return r.x }

// NextData is the first offset from off on outside a hole chunk, or the
// image's size if there is none.
func (r *Reader) NextData(off int64) int64 { return r.next(off, false) }

// NextHole is the first offset from off on in a hole chunk, or the
// image's size if there is none.
func (r *Reader) NextHole(off int64) int64 { return r.next(off, true) }

func (r *Reader) next(off int64, hole bool) int64 {
	if off < 0 {
		off = 0
	}
	for i := off / r.x.ChunkSize; i < int64(len(r.x.Chunks)); i++ {
		if r.x.Chunks[i].Hole() == hole {
			return max(off, i*r.x.ChunkSize)
		}
	}
	return r.x.Size
}

// ReadAt reads len(p) bytes at off, less only at the end of the image.
func (r *Reader) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return r.readAt(ctx, p, off, true)
}

// CopyTo writes the whole image to w, which must read as zeros where
// nothing is written (a new file truncated to the image's size): holes
// are left alone. Its reads are not a boot's and stay out of Profile.
func (r *Reader) CopyTo(ctx context.Context, w io.WriterAt) error {
	buf := make([]byte, 4<<20)
	size := r.x.Size
	for off := r.NextData(0); off < size; off = r.NextData(off) {
		end := r.NextHole(off)
		for off < end {
			if err := ctx.Err(); err != nil {
				return err
			}
			p := buf[:min(int64(len(buf)), end-off)]
			if _, err := r.readAt(ctx, p, off, false); err != nil {
				return fmt.Errorf("reading the image at %d: %w", off, err)
			}
			if _, err := w.WriteAt(p, off); err != nil {
				return err
			}
			off += int64(len(p))
		}
	}
	return nil
}

func (r *Reader) readAt(ctx context.Context, p []byte, off int64, record bool) (int, error) {
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
		if record {
			r.note(i)
		}
		if err := r.readChunk(ctx, i, want, in); err != nil {
			return n, err
		}
		n += len(want)
	}
	return n, nil
}

// readChunk fills p from chunk i at off.
func (r *Reader) readChunk(ctx context.Context, i int, p []byte, off int64) error {
	c := r.x.Chunks[i]
	if c.Hole() {
		clear(p)
		return nil
	}
	r.readAhead(ctx, i)
	size := r.x.Len(i)
	if b := r.recall(c.Digest); b != nil {
		if int64(len(b)) != size {
			return lengthError(c.Digest, size, int64(len(b)))
		}
		copy(p, b[off:])
		return nil
	}
	for try := 0; ; try++ {
		if ok, err := r.store.ReadAt(c.Digest, size, p, off); ok || err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("chunk %d: %w", i, err)
		}
		if try == 3 {
			return fmt.Errorf("chunk %d (%s): stored and gone again, three times", i, c.Digest)
		}
		b, err := r.await(ctx, i, true)
		if err != nil {
			return err
		}
		if b != nil {
			// Fetched for another index entry of the same digest, of
			// another length: the index's error.
			if int64(len(b)) != size {
				return lengthError(c.Digest, size, int64(len(b)))
			}
			copy(p, b[off:])
			return nil
		}
		// A window fetched it meanwhile: it is in the store.
	}
}

func (r *Reader) note(i int) {
	r.mu.Lock()
	if !r.read[i] {
		r.read[i] = true
		r.profile = append(r.profile, i)
	}
	r.mu.Unlock()
}

// await gets chunk i from its pack, once however many ask at a time, and
// stores it; nil, nil means it is in the store already. For a read
// (reading), one that follows the last one's chunks fetches a growing
// window of the chunks after it in the same request, and the next window
// ahead of need: a sequential read streams, while scattered reads (a
// boot's) fetch only the chunks they touch. A prefetch fetches whole
// windows and leaves the reads' sequence alone.
func (r *Reader) await(ctx context.Context, i int, reading bool) ([]byte, error) {
	c := r.x.Chunks[i]
	r.mu.Lock()
	f := r.flights[c.Digest]
	switch {
	case f != nil:
	case r.store.Has(c.Digest):
		r.mu.Unlock()
		return nil, nil
	case !reading:
		r.startLocked(ctx, i, maxWindow, false)
		f = r.flights[c.Digest]
	default:
		if i == r.seqNext {
			r.window = min(r.window*2, maxWindow)
		} else {
			r.window, r.ahead = 1, r.ahead[:0]
		}
		r.seqNext = r.nextLocked(r.startLocked(ctx, i, r.window, true))
		f = r.flights[c.Digest]
		r.aheadLocked(ctx)
	}
	r.mu.Unlock()
	select {
	case <-f.done:
		return f.data, f.err
	case <-ctx.Done():
		return nil, fmt.Errorf("chunk %d: %w", i, ctx.Err())
	}
}

// readAhead keeps a sequential read's windows started ahead of it as it
// reads chunk i, in the stream or not.
func (r *Reader) readAhead(ctx context.Context, i int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ahead) == 0 || i < r.ahead[0] || i >= r.seqNext {
		return
	}
	for len(r.ahead) > 0 && r.ahead[0] <= i {
		r.ahead = r.ahead[1:]
	}
	r.aheadLocked(ctx)
}

// aheadLocked starts windows after the sequential read's last one: none
// for a read that is not sequential (yet), one while its windows grow,
// and maxAhead once they are whole. A boot's short sequential runs
// fetch little more than they read.
func (r *Reader) aheadLocked(ctx context.Context) {
	if r.window < 4 {
		return
	}
	want := 1
	if r.window == maxWindow {
		want = maxAhead
	}
	for len(r.ahead) < want {
		for r.seqNext < len(r.x.Chunks) && !r.idleLocked(r.seqNext) {
			r.seqNext++
		}
		if r.seqNext >= len(r.x.Chunks) {
			return
		}
		r.window = min(r.window*2, maxWindow)
		r.ahead = append(r.ahead, r.seqNext)
		r.seqNext = r.nextLocked(r.startLocked(ctx, r.seqNext, r.window, true))
	}
}

// recall returns chunk d's bytes if it was fetched lately.
func (r *Reader) recall(d digest.Digest) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.recent[d]
}

// remember keeps a fetched chunk's bytes in memory, in place of the
// oldest one kept.
func (r *Reader) remember(d digest.Digest, b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.recent[d]; ok {
		return
	}
	if old := r.recentRing[r.recentNext]; old != "" {
		delete(r.recent, old)
	}
	r.recentRing[r.recentNext] = d
	r.recentNext = (r.recentNext + 1) % len(r.recentRing)
	r.recent[d] = b
}

// maxAhead is how many windows a sequential read keeps under way
// beyond the chunk it reads.
const maxAhead = 4

// recentBytes bounds the fetched chunks a Reader keeps in memory: with
// 512 KiB chunks, the windows a sequential read has under way and the
// one it reads.
const recentBytes = (maxAhead + 1) * maxWindow * 512 << 10

// maxWindow and maxWindowBytes bound the chunks, and their frames'
// bytes, one request fetches.
const (
	maxWindow      = 16
	maxWindowBytes = 8 << 20
)

// idleLocked says whether chunk i is one to fetch: data that nobody has
// or fetches.
func (r *Reader) idleLocked(i int) bool {
	if i >= len(r.x.Chunks) {
		return false
	}
	c := r.x.Chunks[i]
	return !c.Hole() && r.flights[c.Digest] == nil && !r.hasLocked(c.Digest)
}

// hasLocked says whether chunk d is at hand: stored, or fetched lately.
func (r *Reader) hasLocked(d digest.Digest) bool {
	return r.recent[d] != nil || r.store.Has(d)
}

// nextLocked is the first chunk from i on that a sequential read would
// miss: holes and stored chunks are no misses.
func (r *Reader) nextLocked(i int) int {
	for i < len(r.x.Chunks) && (r.x.Chunks[i].Hole() || r.hasLocked(r.x.Chunks[i].Digest)) {
		i++
	}
	return i
}

// startLocked starts one request for chunk i and up to want-1 chunks
// after it whose frames follow its own in the same pack and that nobody
// has or fetches, and returns the index after the last chunk it covers.
// Chunk i must have no flight. With keep, the chunks are also kept in
// memory for the read that asked for them (a prefetch's are not).
func (r *Reader) startLocked(ctx context.Context, i, want int, keep bool) int {
	first := r.x.Chunks[i]
	run := []int{i}
	r.flights[first.Digest] = &flight{done: make(chan struct{})}
	end := first.Offset + first.Length
	k := i + 1
	for ; k < len(r.x.Chunks) && len(run) < want; k++ {
		c := r.x.Chunks[k]
		if !r.idleLocked(k) || c.Pack != first.Pack || c.Offset != end || end+c.Length-first.Offset > maxWindowBytes {
			break
		}
		r.flights[c.Digest] = &flight{done: make(chan struct{})}
		run = append(run, k)
		end += c.Length
	}
	// Not the asker's context: others may wait for these chunks too.
	fctx := context.WithoutCancel(ctx)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.fetchRun(fctx, run, keep)
	}()
	return k
}

// fetchRun fetches the frames of the chunks in run, which follow each
// other in one pack, in one request, and completes their flights.
func (r *Reader) fetchRun(ctx context.Context, run []int, keep bool) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	first, last := r.x.Chunks[run[0]], r.x.Chunks[run[len(run)-1]]
	frames := getFrames(last.Offset + last.Length - first.Offset)
	defer framePool.Put(frames)
	err := r.fetcher.Fetch(ctx, r.x.Packs[first.Pack], first.Offset, *frames)
	if err != nil {
		err = fmt.Errorf("chunks %d-%d: fetching: %w", run[0], run[len(run)-1], err)
	} else {
		r.fetchedBytes.Add(int64(len(*frames)))
		r.fetchedChunks.Add(int64(len(run)))
	}
	for _, i := range run {
		c := r.x.Chunks[i]
		var data []byte
		cerr := err
		if cerr == nil {
			data, cerr = r.verify(ctx, i, (*frames)[c.Offset-first.Offset:c.Offset-first.Offset+c.Length], keep)
		}
		r.mu.Lock()
		f := r.flights[c.Digest]
		delete(r.flights, c.Digest)
		r.mu.Unlock()
		f.data, f.err = data, cerr
		close(f.done)
	}
}

// framePool holds the buffers windows are fetched into: a read of a
// whole image fetches thousands, and freshly allocated memory costs a
// page fault a page.
var framePool = sync.Pool{New: func() any { return new([]byte) }}

// getFrames returns a buffer of n bytes from framePool.
func getFrames(n int64) *[]byte {
	b := framePool.Get().(*[]byte)
	if int64(cap(*b)) < n {
		*b = make([]byte, max(n, maxWindowBytes))
	}
	*b = (*b)[:n]
	return b
}

// verify decompresses chunk i's frame, checks it against the chunk's
// digest and stores it (and keeps it in memory, with keep).
func (r *Reader) verify(ctx context.Context, i int, frame []byte, keep bool) ([]byte, error) {
	c := r.x.Chunks[i]
	b, err := r.dec.DecodeAll(frame, make([]byte, 0, r.x.Len(i)))
	if err != nil {
		return nil, fmt.Errorf("chunk %d (%s): decompressing: %w", i, c.Digest, err)
	}
	if int64(len(b)) != r.x.Len(i) || digest.FromBytes(b) != c.Digest {
		return nil, fmt.Errorf("chunk %d: does not match its digest %s", i, c.Digest)
	}
	if keep {
		r.remember(c.Digest, b)
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
	workers = max(workers, 1)
	work := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if _, err := r.await(ctx, i, false); err != nil {
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
