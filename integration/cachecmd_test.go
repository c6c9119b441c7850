package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnfs/kiln/integration/testimage"
)

// cacheListing is kiln cache ls --json's output.
type cacheListing struct {
	Images []struct {
		Key       string            `json:"key"`
		Image     string            `json:"image"`
		Digest    string            `json:"digest"`
		ChainID   string            `json:"chain_id"`
		Layers    []string          `json:"layers"`
		Options   map[string]string `json:"options"`
		Refs      []string          `json:"refs"`
		LastUsed  time.Time         `json:"last_used"`
		Size      int64             `json:"size"`
		Allocated int64             `json:"allocated"`
	} `json:"images"`
	Blobs []struct {
		Digest    string    `json:"digest"`
		Size      int64     `json:"size"`
		Allocated int64     `json:"allocated"`
		LastUsed  time.Time `json:"last_used"`
	} `json:"blobs"`
}

func cacheLs(t *testing.T, cache string) *cacheListing {
	t.Helper()
	res := kiln(t, run{args: []string{"cache", "ls", "--json", "--cache-dir", cache}})
	if res.err != nil {
		t.Fatalf("kiln cache ls: %v\n%s", res.err, res.stderr)
	}
	var l cacheListing
	if err := json.Unmarshal([]byte(res.stdout), &l); err != nil {
		t.Fatalf("parsing kiln cache ls --json: %v\n%s", err, res.stdout)
	}
	return &l
}

// images lists the references the cached images were built from, least
// recently used first.
func (l *cacheListing) images() []string {
	var out []string
	for _, im := range l.Images {
		out = append(out, im.Image)
	}
	return out
}

func (l *cacheListing) blobs() []string {
	var out []string
	for _, b := range l.Blobs {
		out = append(out, b.Digest)
	}
	return out
}

func kilnCache(t *testing.T, cache string, args ...string) string {
	t.Helper()
	res := kiln(t, run{args: append(append([]string{"cache"}, args...), "--cache-dir", cache)})
	if res.err != nil {
		t.Fatalf("kiln cache %s: %v\n%s", strings.Join(args, " "), res.err, res.stderr)
	}
	return res.stdout
}

// smallImage pushes a one-layer image whose layer is unique to name.
func smallImage(t *testing.T, name string) (ref string, layers []string) {
	t.Helper()
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile(name, 0o644, t1, strings.Repeat(name, 50000)))}}})
	return mustPush(t, "cachecmd-"+name+":v1", img), layerDigests(t, img)
}

// convertSmall converts a small image per name, in order, into a new
// cache, and returns its directory, the cache, and each name's reference
// and layers.
func convertSmall(t *testing.T, names ...string) (dir, cache string, refs []string, layers [][]string) {
	t.Helper()
	dir = t.TempDir()
	cache = filepath.Join(dir, "cache")
	pushed := map[string]int{}
	for _, name := range names {
		i, ok := pushed[name]
		if !ok {
			ref, ls := smallImage(t, name)
			i, pushed[name] = len(refs), len(refs)
			refs, layers = append(refs, ref), append(layers, ls)
		}
		convert(t, refs[i], filepath.Join(dir, "out.ext4"), cache)
	}
	return dir, cache, refs, layers
}

// TestCacheLs: kiln cache ls shows each converted image with the reference,
// digest and chain ID it came from, its options and sizes, and the layer
// blobs; the table and --json agree.
func TestCacheLs(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	refA, layersA := smallImage(t, "lsa")
	refB, layersB := smallImage(t, "lsb")
	sa := convert(t, refA, filepath.Join(dir, "a.ext4"), cache)
	sb := convert(t, refB, filepath.Join(dir, "b.ext4"), cache, "--size", "64M")

	l := cacheLs(t, cache)
	if got := l.images(); !slices.Equal(got, []string{refA, refB}) {
		t.Fatalf("cached images %v, want %s then %s", got, refA, refB)
	}
	for i, s := range []*summary{sa, sb} {
		im := l.Images[i]
		if im.Digest != s.Digest || im.ChainID != s.ChainID {
			t.Errorf("%s: digest %s, chain ID %s; kiln convert said %s, %s", im.Image, im.Digest, im.ChainID, s.Digest, s.ChainID)
		}
		if im.Size != s.Size || im.Allocated <= 0 || im.Allocated > im.Size {
			t.Errorf("%s: size %d, allocated %d; the output is %d bytes", im.Image, im.Size, im.Allocated, s.Size)
		}
		if len(im.Key) != 64 || im.LastUsed.IsZero() {
			t.Errorf("%s: key %q, last used %v", im.Image, im.Key, im.LastUsed)
		}
	}
	if l.Images[0].Options["size"] != "auto" || l.Images[1].Options["size"] != strconv.Itoa(64<<20) {
		t.Errorf("options %v and %v do not say the sizes asked for", l.Images[0].Options, l.Images[1].Options)
	}
	if !slices.Equal(l.Images[0].Layers, layersA) || !slices.Equal(l.Images[1].Layers, layersB) {
		t.Errorf("layers %v and %v, want %v and %v", l.Images[0].Layers, l.Images[1].Layers, layersA, layersB)
	}
	if got, want := l.blobs(), append(slices.Clone(layersA), layersB...); !slices.Equal(got, want) {
		t.Errorf("cached blobs %v, want %v", got, want)
	}
	for _, b := range l.Blobs {
		if b.Size <= 0 || b.Allocated <= 0 {
			t.Errorf("blob %s: size %d, allocated %d", b.Digest, b.Size, b.Allocated)
		}
	}

	table := kilnCache(t, cache, "ls")
	t.Logf("kiln cache ls:\n%s", table)
	for _, want := range []string{refA, refB, l.Images[0].Key[:12], strings.TrimPrefix(layersA[0], "sha256:")[:12], "MiB", "size=auto"} {
		if !strings.Contains(table, want) {
			t.Errorf("the table does not show %q", want)
		}
	}
}

// TestCachePruneLRU: pruning to a budget evicts the least recently used
// entries, so the image converted again last stays and the one unused
// longest goes; convert --cache-max-size applies a budget after each
// conversion and keeps the image it just wrote.
func TestCachePruneLRU(t *testing.T) {
	dir, cache, refs, layers := convertSmall(t, "lrua", "lrub", "lruc", "lrua")
	refA, refB, refC, layersB := refs[0], refs[1], refs[2], layers[1]
	l := cacheLs(t, cache)
	if got := l.images(); !slices.Equal(got, []string{refB, refC, refA}) {
		t.Fatalf("least recently used first: %v, want %s, %s, %s", got, refB, refC, refA)
	}
	// Older than B's image: A's blob, then B's. Evicting exactly those
	// and B's image fits the budget.
	var total, evict int64
	for _, im := range l.Images {
		total += im.Allocated
		if im.Image == refB {
			evict += im.Allocated
		}
	}
	for i, b := range l.Blobs {
		total += b.Allocated
		if i < 2 {
			evict += b.Allocated
		}
	}
	out := kilnCache(t, cache, "prune", "--max-size", strconv.FormatInt(total-evict, 10))
	t.Logf("kiln cache prune:\n%s", out)
	l = cacheLs(t, cache)
	if got := l.images(); !slices.Equal(got, []string{refC, refA}) {
		t.Errorf("after the prune: %v, want %s and %s (used last)", got, refC, refA)
	}
	if slices.Contains(l.blobs(), layersB[0]) || len(l.Blobs) != 1 {
		t.Errorf("after the prune the blobs are %v, want only C's", l.blobs())
	}

	// A budget smaller than one image: everything else goes, the image
	// just written stays.
	convert(t, refB, filepath.Join(dir, "out.ext4"), cache, "--cache-max-size", "4K")
	l = cacheLs(t, cache)
	if got := l.images(); !slices.Equal(got, []string{refB}) || len(l.Blobs) != 0 {
		t.Errorf("after convert --cache-max-size 4K: images %v, blobs %v; want only %s", got, l.blobs(), refB)
	}
}

// TestCacheRm removes images by the reference they came from and by key
// prefix, then with --blobs the blobs no cached image was built from.
func TestCacheRm(t *testing.T) {
	_, cache, refs, layers := convertSmall(t, "rma", "rmb", "rmc")
	refA, refB, layersA, layersB := refs[0], refs[1], layers[0], layers[1]
	keyC := cacheLs(t, cache).Images[2].Key
	kilnCache(t, cache, "rm", refA, keyC[:10])
	l := cacheLs(t, cache)
	if got := l.images(); !slices.Equal(got, []string{refB}) {
		t.Errorf("after kiln cache rm %s %s: %v, want only %s", refA, keyC[:10], got, refB)
	}
	if left, _ := filepath.Glob(filepath.Join(cache, "rootfs", "*")); len(left) != 2 {
		t.Errorf("the cache's rootfs directory holds %v, want B's image and its record", left)
	}
	if res := kiln(t, run{args: []string{"cache", "rm", refA, "--cache-dir", cache}}); res.err == nil || !strings.Contains(res.stderr, refA) {
		t.Errorf("removing what is not cached: %v, %q; want an error naming it", res.err, res.stderr)
	}
	kilnCache(t, cache, "rm", "--blobs")
	if got := cacheLs(t, cache).blobs(); !slices.Equal(got, layersB) {
		t.Errorf("after kiln cache rm --blobs: %v, want only B's %v (not A's %v)", got, layersB, layersA)
	}
}

// flockHeldBy reports whether pid holds a flock on path, from /proc/locks.
func flockHeldBy(t *testing.T, pid int, path string) bool {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		return false
	}
	ino := fi.Sys().(*syscall.Stat_t).Ino
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Skipf("no /proc/locks to see what kiln holds: %v", err)
	}
	for _, line := range strings.Split(string(locks), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[1] == "FLOCK" && f[4] == strconv.Itoa(pid) && strings.HasSuffix(f[5], fmt.Sprintf(":%d", ino)) {
			return true
		}
	}
	return false
}

// TestCachePruneSkipsHeld stops a conversion while it reads a cached blob
// and prunes everything meanwhile: the blob it holds stays, and the
// conversion finishes without fetching it again.
func TestCachePruneSkipsHeld(t *testing.T) {
	ref, img := bigImage(t, "cachecmd-held:v1")
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	convert(t, ref, filepath.Join(dir, "first.ext4"), cache)
	kilnCache(t, cache, "rm", ref) // the blobs stay, so the next run reads them
	big := layerDigests(t, img)[0]
	lock := filepath.Join(cache, "locks", strings.Replace(big, ":", "-", 1))

	n := len(reg.Requests())
	cmd := exec.Command(kilnBin, convertArgs(ref, filepath.Join(dir, "out.ext4"), cache)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "DOCKER_CONFIG=" + t.TempDir()}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT) //nolint:errcheck // it may have finished
		cmd.Process.Kill()                  //nolint:errcheck // it may have finished
		<-done
	})
	deadline := time.Now().Add(time.Minute)
	for !flockHeldBy(t, cmd.Process.Pid, lock) {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("kiln convert ended (%v) without being seen holding the cached blob's lock\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("kiln convert never held the cached blob's lock")
		}
		time.Sleep(time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	out := kilnCache(t, cache, "prune", "--all")
	t.Logf("kiln cache prune --all while kiln convert reads %s:\n%s", big, out)
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "in use by running conversions kept") {
		t.Errorf("the prune does not say it kept what a conversion uses")
	}
	if got := cacheLs(t, cache).blobs(); !slices.Contains(got, big) {
		t.Errorf("the prune evicted the blob a conversion was reading: left %v", got)
	}
	err := <-done
	done <- err
	if err != nil {
		t.Fatalf("the conversion failed: %v\n%s", err, stderr.String())
	}
	if slices.Contains(blobFetches("cachecmd-held", n), big) {
		t.Errorf("the conversion fetched %s again", big)
	}
}
