package store

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/chunked"
)

func openTemp(t *testing.T) (*Store, context.Context) {
	t.Helper()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s, context.Background()
}

// addImage publishes an image of size bytes of data under key, built from
// ref, as kiln convert does.
func addImage(t *testing.T, s *Store, key, ref string, size int, layers ...digest.Digest) {
	t.Helper()
	wd, err := s.NewWorkDir()
	if err != nil {
		t.Fatal(err)
	}
	defer wd.Release()
	f := filepath.Join(wd.Path, "rootfs.ext4")
	if err := os.WriteFile(f, bytes.Repeat([]byte{1}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	im := Image{Key: key, Image: ref, Digest: digest.FromString(ref), ChainID: digest.FromString("chain " + ref), Layers: layers}
	if _, err := s.PublishRootfs(context.Background(), f, im); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // distinct last uses
}

func addBlob(t *testing.T, s *Store, data string) digest.Digest {
	t.Helper()
	d := digest.FromString(data)
	ctx := context.Background()
	if err := content.WriteBlob(ctx, s.Content(), d.String(), strings.NewReader(data), ocispec.Descriptor{Digest: d, Size: int64(len(data))}); err != nil {
		t.Fatal(err)
	}
	l, err := s.LockBlob(ctx, d, false) // marks it used, as a conversion does
	if err != nil {
		t.Fatal(err)
	}
	l.Unlock()
	time.Sleep(10 * time.Millisecond)
	return d
}

func keys(ims []Image) []string {
	var out []string
	for _, im := range ims {
		out = append(out, im.Key)
	}
	return out
}

func TestListRecordsSourceAndSize(t *testing.T) {
	s, ctx := openTemp(t)
	b := addBlob(t, s, "layer one")
	addImage(t, s, "aaaa", "registry.test/one:v1", 3<<20, b)
	if err := s.RecordUse(ctx, Image{Key: "aaaa", Image: "registry.test/one:latest"}); err != nil {
		t.Fatal(err)
	}
	list, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Images) != 1 || len(list.Blobs) != 1 {
		t.Fatalf("listing %+v, want one image and one blob", list)
	}
	im := list.Images[0]
	if im.Image != "registry.test/one:v1" || im.ChainID != digest.FromString("chain registry.test/one:v1") || !slices.Equal(im.Layers, []digest.Digest{b}) {
		t.Errorf("image record %+v does not say what it was built from", im)
	}
	if !slices.Equal(im.Refs, []string{"registry.test/one:v1", "registry.test/one:latest"}) {
		t.Errorf("refs %v, want both references served", im.Refs)
	}
	if im.Size != 3<<20 || im.Allocated < 3<<20 {
		t.Errorf("image size %d, allocated %d, want %d of data", im.Size, im.Allocated, 3<<20)
	}
	if !im.LastUsed.After(im.Built) {
		t.Errorf("last use %v is not after the build %v", im.LastUsed, im.Built)
	}
	if list.Blobs[0].Digest != b || list.Blobs[0].Size != int64(len("layer one")) {
		t.Errorf("blob %+v, want %s", list.Blobs[0], b)
	}
}

// TestPruneLRU: a prune to a budget evicts the least recently used entries
// first, blobs and images alike, and keeps the one used last.
func TestPruneLRU(t *testing.T) {
	s, ctx := openTemp(t)
	oldBlob := addBlob(t, s, strings.Repeat("x", 64<<10))
	addImage(t, s, "aaaa", "one", 1<<20)
	addImage(t, s, "bbbb", "two", 1<<20)
	addImage(t, s, "cccc", "three", 1<<20)
	// Using the first image again makes the second the oldest image.
	if err := s.RecordUse(ctx, Image{Key: "aaaa", Image: "one"}); err != nil {
		t.Fatal(err)
	}
	res, err := s.Prune(ctx, 2<<20+(512<<10))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(keys(res.Images), []string{"bbbb"}) || len(res.Blobs) != 1 || res.Blobs[0].Digest != oldBlob {
		t.Errorf("pruned images %v and blobs %+v, want bbbb and %s", keys(res.Images), res.Blobs, oldBlob)
	}
	list, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(list.Images); !slices.Equal(got, []string{"cccc", "aaaa"}) {
		t.Errorf("left %v, want cccc and aaaa (used last)", got)
	}
	if list.Total() != res.Left || res.Left > 2<<20+(512<<10) {
		t.Errorf("the cache takes %d, prune says %d", list.Total(), res.Left)
	}
	if _, err := os.Stat(s.RootfsPath("bbbb")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the evicted image is still there: %v", err)
	}
	if _, err := os.Stat(s.sidecarPath("bbbb")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the evicted image's record is still there: %v", err)
	}
}

// TestPruneSkipsHeld: what a running conversion holds (an image it
// serves, a blob it reads) is not evicted, even by prune --all.
func TestPruneSkipsHeld(t *testing.T) {
	s, ctx := openTemp(t)
	b := addBlob(t, s, "held blob")
	addBlob(t, s, "free blob")
	addImage(t, s, "aaaa", "held", 4096)
	addImage(t, s, "bbbb", "free", 4096)
	img, err := s.UseRootfs(ctx, "aaaa")
	if err != nil {
		t.Fatal(err)
	}
	blob, err := s.LockBlob(ctx, b, false)
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Prune(ctx, -1)
	if err != nil {
		t.Fatal(err)
	}
	if res.Skipped != 2 || !slices.Equal(keys(res.Images), []string{"bbbb"}) || len(res.Blobs) != 1 || res.Blobs[0].Digest == b {
		t.Errorf("prune removed images %v, blobs %+v, skipped %d: want bbbb and the free blob, 2 skipped", keys(res.Images), res.Blobs, res.Skipped)
	}
	if err := s.RemoveImage("aaaa"); !errors.Is(err, ErrInUse) {
		t.Errorf("removing a held image: %v, want ErrInUse", err)
	}
	img.Unlock()
	blob.Unlock()
	if res, err = s.Prune(ctx, -1); err != nil || len(res.Images) != 1 || len(res.Blobs) != 1 {
		t.Errorf("once let go, prune --all removed %+v (%v), want the rest", res, err)
	}
}

func TestFind(t *testing.T) {
	l := &Listing{Images: []Image{
		{Key: "ab12", Image: "reg/a:v1", Refs: []string{"reg/a:v1", "reg/a:latest"}},
		{Key: "ab34", Image: "reg/b:v1", Digest: digest.FromString("b")},
		{Key: "cd56", Image: "reg/a:v1"},
	}}
	for _, tc := range []struct {
		args []string
		want []string
		err  string
	}{
		{args: []string{"ab1"}, want: []string{"ab12"}},
		{args: []string{"reg/a:v1"}, want: []string{"ab12", "cd56"}},
		{args: []string{"reg/a:latest", "ab12"}, want: []string{"ab12"}},
		{args: []string{digest.FromString("b").String()}, want: []string{"ab34"}},
		{args: []string{"ab"}, err: "start of 2 build keys"},
		{args: []string{"reg/c"}, err: `no cached image is "reg/c"`},
	} {
		got, err := Find(l, tc.args)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Find(%v): %v, want an error saying %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(keys(got), tc.want) {
			t.Errorf("Find(%v) = %v, %v; want %v", tc.args, keys(got), err, tc.want)
		}
	}
}

// TestRemoveUnusedBlobs keeps the blobs of images still cached.
func TestRemoveUnusedBlobs(t *testing.T) {
	s, ctx := openTemp(t)
	kept, gone := addBlob(t, s, "kept"), addBlob(t, s, "gone")
	addImage(t, s, "aaaa", "a", 4096, kept)
	addImage(t, s, "bbbb", "b", 4096, gone)
	if err := s.RemoveImage("bbbb"); err != nil {
		t.Fatal(err)
	}
	res, err := s.RemoveUnusedBlobs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Blobs) != 1 || res.Blobs[0].Digest != gone {
		t.Errorf("removed %+v, want only %s", res.Blobs, gone)
	}
	if _, err := s.Content().Info(ctx, kept); err != nil {
		t.Errorf("the blob of a cached image is gone: %v", err)
	}
}

// addChunks caches n chunks of size bytes through the chunk cache kiln
// mount uses, each used after the last.
func addChunks(t *testing.T, s *Store, tag string, n, size int) []digest.Digest {
	t.Helper()
	cs, err := chunked.OpenStore(chunked.StoreDir(s.root), 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []digest.Digest
	for i := range n {
		b := bytes.Repeat([]byte(tag+string(rune('a'+i))), size/2)
		d := digest.FromBytes(b)
		if err := cs.Put(d, b); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		out = append(out, d)
	}
	return out
}

// TestPruneChunks: the chunks kiln mount caches are listed, counted in
// the cache's size and evicted in the same least-recently-used order as
// images and blobs.
func TestPruneChunks(t *testing.T) {
	s, ctx := openTemp(t)
	old := addChunks(t, s, "o", 2, 64<<10)
	addImage(t, s, "aaaa", "one", 1<<20)
	recent := addChunks(t, s, "r", 2, 64<<10)
	list, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if list.Chunks.Count != 4 || list.Chunks.Allocated < 4*64<<10 || list.Total() < 1<<20+4*64<<10 {
		t.Fatalf("listing %+v (total %d), want 4 chunks of 64 KiB counted", list.Chunks, list.Total())
	}
	// Room for the image and about two chunks: the older two go.
	res, err := s.Prune(ctx, list.Total()-2*list.Chunks.Allocated/4)
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks.Count != 2 || len(res.Images) != 0 {
		t.Errorf("pruned %d chunks and images %v, want the 2 oldest chunks", res.Chunks.Count, keys(res.Images))
	}
	cs, err := chunked.OpenStore(chunked.StoreDir(s.root), 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range old {
		if cs.Has(d) {
			t.Errorf("old chunk %s is still cached", d)
		}
	}
	for _, d := range recent {
		if !cs.Has(d) {
			t.Errorf("recent chunk %s was evicted", d)
		}
	}
	if res, err = s.Prune(ctx, -1); err != nil || res.Chunks.Count != 2 || len(res.Images) != 1 {
		t.Fatalf("prune --all removed %+v, %v; want the image and both chunks", res, err)
	}
	if list, err = s.List(ctx); err != nil || list.Total() != 0 {
		t.Errorf("after prune --all the cache takes %d (%v)", list.Total(), err)
	}
}

// TestLockFilesRemoved: removing an image or a blob removes its lock
// files, a prune removes those of blobs a failed fetch never stored,
// and leaves only the management lock and the locks somebody holds.
func TestLockFilesRemoved(t *testing.T) {
	s, ctx := openTemp(t)
	addBlob(t, s, "a blob")
	addImage(t, s, "aaaa", "an image", 4096)
	for _, data := range []string{"fetch failed", "being fetched"} {
		l, err := s.LockBlob(ctx, digest.FromString(data), true)
		if err != nil {
			t.Fatal(err)
		}
		if data == "fetch failed" {
			l.Unlock()
		} else {
			defer l.Unlock()
		}
	}
	if _, err := s.Prune(ctx, -1); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(s.root, "locks"))
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	held := filepath.Base(s.blobLockPath(digest.FromString("being fetched")))
	if !slices.Equal(left, []string{"manage", held}) {
		t.Errorf("lock files left after a prune of everything: %v, want the management lock and %s", left, held)
	}
}

// TestLockAcrossRemoval: a lock holds while removals delete its file
// between others' open and flock: never two exclusive holders at once.
func TestLockAcrossRemoval(t *testing.T) {
	s, ctx := openTemp(t)
	d := digest.FromString("contended blob")
	var holders atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				l, err := s.LockBlob(ctx, d, true)
				if err != nil {
					t.Error(err)
					return
				}
				if n := holders.Add(1); n != 1 {
					t.Errorf("%d exclusive holders of one lock", n)
				}
				time.Sleep(50 * time.Microsecond)
				holders.Add(-1)
				l.Unlock()
			}
		}()
	}
	removals := 0
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		err := s.RemoveBlob(ctx, d)
		if err == nil {
			removals++
		} else if !errors.Is(err, ErrInUse) {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if removals == 0 {
		t.Error("no removal got the lock: the test proved nothing")
	}
	t.Logf("%d removals of the lock file", removals)
}
