package chunked

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// packFiles fetches frames from the packs Cut wrote, counting them; a
// pack's bytes can be swapped to play a registry serving others.
type packFiles struct {
	mu      sync.Mutex
	paths   map[digest.Digest]string
	fetches int
	swap    map[digest.Digest][]byte
	block   chan struct{}
}

func (p *packFiles) Fetch(ctx context.Context, pack Pack, off int64, dst []byte) error {
	p.mu.Lock()
	p.fetches++
	b, swapped := p.swap[pack.Digest]
	block := p.block
	p.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if !swapped {
		var err error
		if b, err = os.ReadFile(p.paths[pack.Digest]); err != nil {
			return err
		}
	}
	if off+int64(len(dst)) > int64(len(b)) {
		return errors.New("range past the pack's end")
	}
	copy(dst, b[off:])
	return nil
}

// testImage is an image with data, a hole, repeated chunks and an odd
// length.
func testImage(t *testing.T, chunk int) []byte {
	t.Helper()
	img := make([]byte, 9*chunk+1234)
	rand.Read(img[:2*chunk])                                   // two chunks of noise
	copy(img[3*chunk:], img[:chunk])                           // chunk 3 repeats chunk 0
	copy(img[5*chunk:], bytes.Repeat([]byte("kiln"), chunk/4)) // compressible
	copy(img[6*chunk:], img[5*chunk:6*chunk])
	rand.Read(img[9*chunk:])
	return img
}

func cut(t *testing.T, img []byte, chunk, pack int64) (*Index, *packFiles) {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "image")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	x, packs, err := Cut(context.Background(), f, dir, chunk, pack)
	if err != nil {
		t.Fatal(err)
	}
	if err := x.Validate(); err != nil {
		t.Fatalf("the index Cut wrote does not validate: %v", err)
	}
	pf := &packFiles{paths: map[digest.Digest]string{}, swap: map[digest.Digest][]byte{}}
	for _, pk := range packs {
		pf.paths[pk.Digest] = pk.Path
	}
	return x, pf
}

func TestCutAndRead(t *testing.T) {
	const chunk = 64 << 10
	img := testImage(t, chunk)
	x, pf := cut(t, img, chunk, chunk+chunk/2)
	if x.Digest != digest.FromBytes(img) || x.Size != int64(len(img)) {
		t.Errorf("index says %s, %d bytes; want %s, %d", x.Digest, x.Size, digest.FromBytes(img), len(img))
	}
	if !x.Chunks[2].Hole() || !x.Chunks[4].Hole() || x.Chunks[7].Hole() == false {
		t.Errorf("zero chunks 2, 4, 7, 8 are not holes: %+v", x.Chunks)
	}
	if x.Chunks[3] != x.Chunks[0] || x.Chunks[6] != x.Chunks[5] {
		t.Errorf("repeated chunks are stored twice: %+v", x.Chunks)
	}
	if len(x.Packs) < 2 {
		t.Errorf("%d packs for frames past the pack size", len(x.Packs))
	}

	r := openReader(t, x, pf)
	s := r.store
	// Reads of every alignment, from several goroutines at once.
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := int64(g * 1000); off < int64(len(img)); off += 40000 {
				p := make([]byte, 70000)
				n, err := r.ReadAt(context.Background(), p, off)
				if err != nil {
					t.Errorf("ReadAt %d: %v", off, err)
					return
				}
				if want := img[off:min(int64(len(img)), off+int64(len(p)))]; !bytes.Equal(p[:n], want) {
					t.Errorf("ReadAt %d: %d bytes differ from the image's %d", off, n, len(want))
					return
				}
			}
		}()
	}
	wg.Wait()
	// Four distinct chunks hold data: each fetched once.
	if st := r.Stats(); st.FetchedChunks != 4 {
		t.Errorf("fetched %d chunks, want the 4 distinct ones once each", st.FetchedChunks)
	}
	if got := r.Profile(); len(got) != len(x.Chunks) {
		t.Errorf("profile %v: want every chunk once", got)
	}

	// A second reader on the same store fetches nothing.
	r2, _ := NewReader(x, pf, s, 0)
	defer r2.Close()
	whole := make([]byte, len(img))
	if n, err := r2.ReadAt(context.Background(), whole, 0); err != nil || !bytes.Equal(whole[:n], img) {
		t.Fatalf("read from the store: %d bytes, %v", n, err)
	}
	if st := r2.Stats(); st.FetchedChunks != 0 {
		t.Errorf("fetched %d chunks the store held", st.FetchedChunks)
	}
}

// TestTamperedChunk: a frame that decompresses to other bytes is never
// returned, and a damaged chunk in the store is fetched again.
func TestTamperedChunk(t *testing.T) {
	const chunk = 64 << 10
	img := testImage(t, chunk)
	x, pf := cut(t, img, chunk, 1<<30)
	other := testImage(t, chunk)
	y, opf := cut(t, other, chunk, 1<<30)
	// The registry serves the other image's pack for this one's.
	b, _ := os.ReadFile(opf.paths[y.Packs[0].Digest])
	pf.swap[x.Packs[0].Digest] = b
	x.Chunks[0].Length = y.Chunks[0].Length // the frame is whole, its content other
	s, _ := OpenStore(t.TempDir(), 0)
	r, _ := NewReader(x, pf, s, 0)
	defer r.Close()
	p := make([]byte, 100)
	if _, err := r.ReadAt(context.Background(), p, 0); err == nil || !strings.Contains(err.Error(), "does not match its digest") {
		t.Errorf("a chunk of other bytes: %v, want a digest mismatch", err)
	}
	if s.Has(x.Chunks[0].Digest) {
		t.Error("a chunk that did not verify was stored")
	}

	// A chunk damaged in the store after a restart is checked, dropped
	// and fetched again.
	delete(pf.swap, x.Packs[0].Digest)
	x, pf = cut(t, img, chunk, 1<<30)
	dir := t.TempDir()
	s, _ = OpenStore(dir, 0)
	r, _ = NewReader(x, pf, s, 0)
	if _, err := r.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	r.Close()
	cp := filepath.Join(dir, "sha256", x.Chunks[0].Digest.Encoded())
	damaged, _ := os.ReadFile(cp)
	damaged[10] ^= 1
	os.WriteFile(cp, damaged, 0o600)
	s, _ = OpenStore(dir, 0)
	r, _ = NewReader(x, pf, s, 0)
	defer r.Close()
	if _, err := r.ReadAt(context.Background(), p, 0); err != nil || !bytes.Equal(p, img[:100]) {
		t.Errorf("read over a damaged cached chunk: %v, right bytes %v", err, bytes.Equal(p, img[:100]))
	}
	if r.Stats().FetchedChunks != 1 {
		t.Errorf("the damaged chunk was not fetched again")
	}
}

// TestFetchTimeout: a fetch that does not end fails within the timeout.
func TestFetchTimeout(t *testing.T) {
	const chunk = 64 << 10
	x, pf := cut(t, testImage(t, chunk), chunk, 1<<30)
	pf.block = make(chan struct{})
	defer close(pf.block)
	s, _ := OpenStore(t.TempDir(), 0)
	r, _ := NewReader(x, pf, s, 200*time.Millisecond)
	defer r.Close()
	start := time.Now()
	_, err := r.ReadAt(context.Background(), make([]byte, 10), 0)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Errorf("a fetch that hangs: %v after %v, want a deadline within the timeout", err, time.Since(start))
	}
}

// TestStoreBudget: the least recently used chunks go first, chunks being
// read stay, and the store keeps its chunks and their order across a
// restart.
func TestStoreBudget(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenStore(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ds []digest.Digest
	for i := range 5 {
		b := bytes.Repeat([]byte{byte(i + 1)}, 1000)
		d := digest.FromBytes(b)
		ds = append(ds, d)
		if err := s.Put(d, b); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(time.Duration(i-10) * time.Hour)
		os.Chtimes(s.path(d), old, old)
	}
	s, err = OpenStore(dir, 0)
	if err != nil || s.Size() != 5000 {
		t.Fatalf("reopened store: %v, %d bytes, want 5000", err, s.Size())
	}
	// Chunk 0 is the oldest; reading it makes it the newest.
	if ok, err := s.ReadAt(ds[0], 1000, make([]byte, 10), 0); !ok || err != nil {
		t.Fatalf("reading a cached chunk: %v %v", ok, err)
	}
	if freed := s.Prune(2500); freed != 3000 {
		t.Errorf("pruned %d bytes, want 3000", freed)
	}
	for i, d := range ds {
		if want := i == 0 || i == 4; s.Has(d) != want {
			t.Errorf("chunk %d kept %v, want %v", i, s.Has(d), want)
		}
	}
	left, _ := os.ReadDir(filepath.Join(dir, "sha256"))
	if len(left) != 2 {
		t.Errorf("%d files left in the store, want 2", len(left))
	}
}

func TestIndexValidate(t *testing.T) {
	const chunk = 64 << 10
	good, _ := cut(t, testImage(t, chunk), chunk, 1<<30)
	for name, change := range map[string]func(x *Index){
		"version":        func(x *Index) { x.Version = 2 },
		"chunk size":     func(x *Index) { x.ChunkSize = 1000 },
		"too few chunks": func(x *Index) { x.Chunks = x.Chunks[1:] },
		"size":           func(x *Index) { x.Size = -1 },
		"pack index":     func(x *Index) { x.Chunks[0].Pack = 7 },
		"frame past end": func(x *Index) { x.Chunks[0].Offset = x.Packs[0].Size },
		"huge frame":     func(x *Index) { x.Chunks[0].Length = 10 * chunk },
		"hole w/ frame":  func(x *Index) { x.Chunks[2].Length = 5 },
		"bad digest":     func(x *Index) { x.Chunks[0].Digest = "sha256:zz" },
		"short digest":   func(x *Index) { x.Chunks[1] = x.Chunks[len(x.Chunks)-1] },
		"long digest":    func(x *Index) { x.Chunks[len(x.Chunks)-1] = x.Chunks[0] },
	} {
		x := *good
		x.Chunks = append([]Chunk(nil), good.Chunks...)
		change(&x)
		if err := x.Validate(); err == nil {
			t.Errorf("%s: an index that is wrong validates", name)
		}
	}
}

// TestReadWindows: a sequential read fetches growing windows of chunks
// in few requests; scattered reads fetch only the chunks they touch.
func TestReadWindows(t *testing.T) {
	const chunk = 64 << 10
	img := make([]byte, 64*chunk)
	rand.Read(img)
	x, pf := cut(t, img, chunk, 1<<30)
	s, _ := OpenStore(t.TempDir(), 0)
	r, _ := NewReader(x, pf, s, 0)
	defer r.Close()
	for _, i := range []int{5, 40, 12} {
		if _, err := r.ReadAt(context.Background(), make([]byte, 100), int64(i)*chunk+7); err != nil {
			t.Fatal(err)
		}
	}
	if st := r.Stats(); st.FetchedChunks != 3 || pf.fetches != 3 {
		t.Errorf("three scattered reads fetched %d chunks in %d requests, want 3 in 3", st.FetchedChunks, pf.fetches)
	}
	got := make([]byte, len(img))
	for off := 0; off < len(img); off += 32 << 10 {
		if _, err := r.ReadAt(context.Background(), got[off:off+32<<10], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, img) {
		t.Fatal("the sequential read differs from the image")
	}
	if st := r.Stats(); st.FetchedChunks != 64 || pf.fetches > 20 {
		t.Errorf("a sequential read fetched %d chunks in %d requests, want all 64 in few", st.FetchedChunks, pf.fetches)
	}
	t.Logf("sequential read: %d requests for 64 chunks", pf.fetches)
}

// TestStoreLengthMismatch: an index that gives a cached chunk's digest
// another length fails the read at once rather than loop, and a cached
// chunk a crash cut short is fetched again.
func TestStoreLengthMismatch(t *testing.T) {
	const chunk = 64 << 10
	img := testImage(t, chunk)
	x, pf := cut(t, img, chunk, 1<<30)
	dir := t.TempDir()
	s, _ := OpenStore(dir, 0)
	r, _ := NewReader(x, pf, s, 0)
	if _, err := r.ReadAt(context.Background(), make([]byte, len(img)), 0); err != nil {
		t.Fatal(err)
	}
	r.Close()

	forged := *x
	forged.Chunks = append([]Chunk(nil), x.Chunks...)
	last := len(forged.Chunks) - 1
	forged.Chunks[last] = x.Chunks[0] // a full chunk's digest for the short last one
	r, _ = NewReader(&forged, pf, s, time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := r.ReadAt(ctx, make([]byte, 100), int64(last)*chunk)
	if err == nil || !strings.Contains(err.Error(), "length") || time.Since(start) > 2*time.Second {
		t.Errorf("a chunk of the wrong length: %v after %v, want a length error at once", err, time.Since(start))
	}
	r.Close()

	// A crash left chunk 1's file short; the restarted store fetches it
	// again.
	os.Truncate(filepath.Join(dir, "sha256", x.Chunks[1].Digest.Encoded()), 10)
	s, _ = OpenStore(dir, 0)
	r, _ = NewReader(x, pf, s, 0)
	defer r.Close()
	p := make([]byte, chunk)
	if _, err := r.ReadAt(context.Background(), p, chunk); err != nil || !bytes.Equal(p, img[chunk:2*chunk]) {
		t.Errorf("reading over a short cached chunk: %v, right bytes %v", err, bytes.Equal(p, img[chunk:2*chunk]))
	}
	if r.Stats().FetchedChunks != 1 {
		t.Errorf("fetched %d chunks, want the short one again", r.Stats().FetchedChunks)
	}
}

// TestLengthMismatchInMemory: an index that gives one digest two lengths
// fails the read of the second with a length error when the first is in
// the reader's memory, or in flight, rather than serve wrong bytes or
// cut a buffer past its end.
func TestLengthMismatchInMemory(t *testing.T) {
	const chunk = 64 << 10
	img := testImage(t, chunk)
	x, pf := cut(t, img, chunk, 1<<30)
	last := len(x.Chunks) - 1
	for name, c := range map[string]struct{ forge, first, then int }{
		"short chunk, a whole one's digest": {forge: last, first: 0, then: last},
		"whole chunk, the short one's":      {forge: 1, first: last, then: 1},
	} {
		forged := *x
		forged.Chunks = append([]Chunk(nil), x.Chunks...)
		forged.Chunks[c.forge] = x.Chunks[c.first]
		s, _ := OpenStore(t.TempDir(), 0)
		r, _ := NewReader(&forged, pf, s, 0)
		if _, err := r.ReadAt(context.Background(), make([]byte, 100), int64(c.first)*chunk); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, err := r.ReadAt(context.Background(), make([]byte, 100), int64(c.then)*chunk+1000)
		if err == nil || !strings.Contains(err.Error(), "length") {
			t.Errorf("%s: reading the second: %v, want a length error", name, err)
		}
		r.Close()
	}
}

// testReader is a reader of testImage, from packs in one file, with a
// chunk cache of its own.
func testReader(t *testing.T, chunk int) ([]byte, *Reader) {
	t.Helper()
	img := testImage(t, chunk)
	x, pf := cut(t, img, int64(chunk), 1<<30)
	return img, openReader(t, x, pf)
}

// openReader opens a reader of x with a chunk cache of its own, closed
// when the test ends.
func openReader(t *testing.T, x *Index, f Fetcher) *Reader {
	t.Helper()
	s, err := OpenStore(t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewReader(x, f, s, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// TestNextDataHole: the reader finds data and holes from any offset as
// the image's bytes have them, chunk by chunk.
func TestNextDataHole(t *testing.T) {
	const chunk = 64 << 10
	img, r := testReader(t, chunk)
	zero := func(i int64) bool {
		return !bytes.ContainsFunc(img[i*chunk:min((i+1)*chunk, int64(len(img)))], func(c rune) bool { return c != 0 })
	}
	want := func(off int64, hole bool) int64 {
		for i := off / chunk; i*chunk < int64(len(img)); i++ {
			if zero(i) == hole {
				return max(off, i*chunk)
			}
		}
		return int64(len(img))
	}
	holes := 0
	for off := int64(0); off < int64(len(img)); off += chunk / 3 {
		if got := r.NextData(off); got != want(off, false) {
			t.Errorf("NextData(%d) = %d, want %d", off, got, want(off, false))
		}
		if got := r.NextHole(off); got != want(off, true) {
			t.Errorf("NextHole(%d) = %d, want %d", off, got, want(off, true))
		}
		if zero(off / chunk) {
			holes++
		}
	}
	if holes == 0 {
		t.Error("the test image has no hole")
	}
}

// TestCopyTo: the image written out whole is the image, its holes left
// unwritten, and the copy is not taken for a boot's reads.
func TestCopyTo(t *testing.T) {
	const chunk = 64 << 10
	img, r := testReader(t, chunk)
	out, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if err := out.Truncate(r.Size()); err != nil {
		t.Fatal(err)
	}
	if err := r.CopyTo(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Error("the copy differs from the image")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(out.Name(), &st); err != nil {
		t.Fatal(err)
	}
	if holes := int64(len(img)) - st.Blocks*512; holes < chunk {
		t.Errorf("the copy allocates %d bytes of an image of %d with holes: its holes were written", st.Blocks*512, len(img))
	}
	if p := r.Profile(); len(p) != 0 {
		t.Errorf("the copy is recorded as a boot's reads: %v", p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.CopyTo(ctx, out); !errors.Is(err, context.Canceled) {
		t.Errorf("CopyTo with its context ended: %v", err)
	}
}
