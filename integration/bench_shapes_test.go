package integration

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/layer"
)

// BenchmarkShapes measures, side by side in one run, how kiln and the
// plain alternatives handle five image shapes, pulled from the registry on
// 127.0.0.1:
//
//	minbase-gzip    Debian minbase (debootstrap), one gzip layer
//	minbase-zstd    the same tree, one zstd layer
//	layers9-gzip    9 gzip layers (232 MiB) with whiteouts of files and
//	                of a directory, an opaque directory and hard links to
//	                files of earlier layers (the target copied up, as
//	                docker build writes them)
//	files100k-gzip  100,000 files of up to 2 KiB in one layer: 100
//	                directories of 500 and 5 of 10,000
//	bigfile1g-gzip  one 1 GiB file, half random and half text, one layer
//
// Each iteration, for each shape, measures: a pull into containerd's
// overlayfs (the baseline) and, from an empty content store again, a
// pull into kiln, then `kiln export` of the pulled image (each in a
// containerd and kiln serve of their own, started for the iteration);
// `kiln convert` from the registry into an empty cache directory and
// again from that cache; hcsshim's tar2ext4 on the decompressed layer
// (single-layer shapes: reading the blob, decompressing it as kiln does,
// writing the ext4 and syncing it); and decompressing every layer blob to
// nothing (the floor). Everything starts after a `sync`; no cache is
// dropped. The table (b.Log, and the file KILN_BENCH_TABLE names) gives
// the median overlayfs pull in seconds and the others as ratios of
// medians to it, with kiln's disk use once the image is pulled and its
// disk built (blocks allocated under kiln's root, after the export)
// divided by the uncompressed size of the layer tars.
//
// KILN_BENCH_SHAPES=minbase-gzip,files100k-gzip selects shapes;
// KILN_BENCH_CONVERT_FLAGS adds flags to the kiln convert runs. The
// images are generated once (about 20 s, plus debootstrap for minbase)
// and cached under testimage.CacheDir()/images (1.1 GiB); pushing them
// takes about 35 s each run. On a 2-core machine one iteration of all
// five shapes takes about 2.5 minutes, so -benchtime 3x about 8 minutes;
// it needs about 7 GiB free in TMPDIR (checked first).
func BenchmarkShapes(b *testing.B) {
	shapes, err := selectShapes(os.Getenv("KILN_BENCH_SHAPES"))
	if err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()
	var fixtures []*shapeFixture
	for _, s := range shapes {
		fixtures = append(fixtures, prepareShape(b, s))
	}
	checkFreeSpace(b, work, fixtures)
	runs := map[string][]shapeRun{}
	// b.Loop runs the body b.N times once; a plain b.N loop would first
	// run it once more with b.N = 1.
	for b.Loop() {
		for _, f := range fixtures {
			r := runShape(b, f, work)
			runs[f.name] = append(runs[f.name], r)
			b.Logf("%s: %s", f.name, r)
		}
	}
	table := shapesTable(fixtures, runs)
	b.Log("\n" + table)
	if p := os.Getenv("KILN_BENCH_TABLE"); p != "" {
		if err := os.WriteFile(p, []byte(table), 0o644); err != nil {
			b.Errorf("writing KILN_BENCH_TABLE: %v", err)
		}
	}
	for _, f := range fixtures {
		rs := runs[f.name]
		base := medianOf(rs, func(r shapeRun) float64 { return r.overlay.Seconds() })
		ratio := func(v func(r shapeRun) float64) float64 { return medianOf(rs, v) / base }
		b.ReportMetric(base, f.name+"-overlayfs-s")
		b.ReportMetric(ratio(func(r shapeRun) float64 { return r.pull.Seconds() }), f.name+"-pull/overlayfs")
		b.ReportMetric(ratio(func(r shapeRun) float64 { return (r.pull + r.export).Seconds() }), f.name+"-pull+export/overlayfs")
		b.ReportMetric(ratio(func(r shapeRun) float64 { return r.convert.Seconds() }), f.name+"-convert/overlayfs")
		b.ReportMetric(medianOf(rs, func(r shapeRun) float64 { return float64(r.kilnDisk) / float64(r.uncompressed) }), f.name+"-disk/uncompressed")
	}
}

// shape is an image to measure: its layers, written by build.
type shape struct {
	name, about string
	// version is part of the cache directory's name: change it when
	// build writes something else.
	version string
	build   func(w *ociWriter) error
}

var allShapes = []shape{
	{name: "minbase-gzip", about: "Debian minbase, 1 gzip layer", version: "v1", build: minbaseShape(testimage.Gzip)},
	{name: "minbase-zstd", about: "Debian minbase, 1 zstd layer", version: "v1", build: minbaseShape(testimage.Zstd)},
	{name: "layers9-gzip", about: "9 gzip layers, whiteouts, opaque dir, hard links", version: "v1", build: layers9Shape},
	{name: "files100k-gzip", about: "100k small files, 1 gzip layer", version: "v1", build: files100kShape},
	{name: "bigfile1g-gzip", about: "one 1 GiB file, 1 gzip layer", version: "v1", build: bigFileShape},
}

func selectShapes(list string) ([]shape, error) {
	if strings.TrimSpace(list) == "" {
		return allShapes, nil
	}
	var out []shape
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		i := slices.IndexFunc(allShapes, func(s shape) bool { return s.name == name })
		if i < 0 {
			var names []string
			for _, s := range allShapes {
				names = append(names, s.name)
			}
			return nil, fmt.Errorf("KILN_BENCH_SHAPES: no shape %q (there are %s)", name, strings.Join(names, ", "))
		}
		out = append(out, allShapes[i])
	}
	return out, nil
}

// shapeFixture is a shape's image, cached as an OCI layout and pushed.
type shapeFixture struct {
	shape
	layout string // OCI layout directory, tag shapesTag
	meta   shapeMeta
	ref    string // in reg
}

const shapesTag = "v1"

// shapeMeta describes a cached layout's layers (meta.json next to it).
type shapeMeta struct {
	Layers []shapeLayer `json:"layers"`
}

type shapeLayer struct {
	MediaType    string `json:"media_type"`
	Digest       string `json:"digest"`
	DiffID       string `json:"diff_id"`
	Size         int64  `json:"size"`
	Uncompressed int64  `json:"uncompressed"`
}

func (m shapeMeta) uncompressed() int64 {
	var n int64
	for _, l := range m.Layers {
		n += l.Uncompressed
	}
	return n
}

func (m shapeMeta) compressed() int64 {
	var n int64
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}

// prepareShape builds s's layout once (cached) and pushes it to reg.
func prepareShape(b *testing.B, s shape) *shapeFixture {
	b.Helper()
	start := time.Now()
	dir, err := testimage.Cached(filepath.Join(testimage.CacheDir(), "images", "shape-"+s.name+"-"+s.version), func(tmp string) error {
		w, err := newOCIWriter(filepath.Join(tmp, "layout"))
		if err != nil {
			return err
		}
		if err := s.build(w); err != nil {
			return err
		}
		if err := w.finish(); err != nil {
			return err
		}
		meta, _ := json.MarshalIndent(shapeMeta{Layers: w.layers}, "", "  ")
		return os.WriteFile(filepath.Join(tmp, "meta.json"), meta, 0o644)
	})
	if errors.Is(err, testimage.ErrNeedRoot) {
		b.Skipf("shape %s: needs root: the minbase fixture is made with debootstrap and is not cached yet", s.name)
	}
	if err != nil {
		b.Fatalf("shape %s: building the image: %v", s.name, err)
	}
	f := &shapeFixture{shape: s, layout: filepath.Join(dir, "layout"), ref: reg.Host + "/shapes/" + s.name + ":" + shapesTag}
	data, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err == nil {
		err = json.Unmarshal(data, &f.meta)
	}
	if err == nil && len(f.meta.Layers) == 0 {
		err = errors.New("no layers")
	}
	if err != nil {
		b.Fatalf("shape %s: %s/meta.json: %v (remove the directory to rebuild it)", s.name, dir, err)
	}
	built := time.Since(start)
	p, err := layout.FromPath(f.layout)
	if err != nil {
		b.Fatalf("shape %s: %v", s.name, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		b.Fatalf("shape %s: %v", s.name, err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		b.Fatalf("shape %s: %s: want one manifest (%v)", s.name, f.layout, err)
	}
	img, err := p.Image(im.Manifests[0].Digest)
	if err != nil {
		b.Fatalf("shape %s: %v", s.name, err)
	}
	if err := testimage.Push(f.ref, img); err != nil {
		b.Fatalf("shape %s: pushing %s: %v", s.name, f.ref, err)
	}
	b.Logf("shape %s: %d layers, %s compressed, %s uncompressed; image ready in %v, pushed in %v", s.name,
		len(f.meta.Layers), mib(f.meta.compressed()), mib(f.meta.uncompressed()),
		built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
	return f
}

// checkFreeSpace fails early when TMPDIR cannot hold an iteration of the
// biggest shape: containerd's content and kiln's layers, disk and export
// at once, or a convert's cache, output and cached copy.
func checkFreeSpace(b *testing.B, dir string, fixtures []*shapeFixture) {
	b.Helper()
	var need int64
	for _, f := range fixtures {
		need = max(need, 2*f.meta.compressed()+4*f.meta.uncompressed()+1<<30)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		b.Fatal(err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < need {
		b.Fatalf("%s has %s free; these shapes need about %s (set TMPDIR elsewhere or select fewer with KILN_BENCH_SHAPES)", dir, mib(free), mib(need))
	}
}

// shapeRun is one iteration's measurements of one shape.
type shapeRun struct {
	overlay, pull, export      time.Duration
	convert, cached            time.Duration
	published                  time.Duration // kiln convert of a rootfs kiln push published
	tar2ext4                   time.Duration // 0: not measured
	decompress                 time.Duration
	overlayDisk, kilnDisk      int64 // allocated bytes under containerd's and kiln's roots
	convertSize                int64 // allocated bytes of kiln convert's output
	tar2ext4Size, uncompressed int64
}

func (r shapeRun) String() string {
	s := fmt.Sprintf("overlayfs %.2fs, kiln pull %.2fs + export %.2fs, convert %.2fs, cached %.2fs, published %.2fs, decompress %.2fs",
		r.overlay.Seconds(), r.pull.Seconds(), r.export.Seconds(), r.convert.Seconds(), r.cached.Seconds(), r.published.Seconds(), r.decompress.Seconds())
	if r.tar2ext4 > 0 {
		s += fmt.Sprintf(", tar2ext4 %.2fs", r.tar2ext4.Seconds())
	}
	return s + fmt.Sprintf("; disk: containerd (overlayfs) %s, kiln %s, convert output %s", mib(r.overlayDisk), mib(r.kilnDisk), mib(r.convertSize))
}

// runShape measures one iteration of f; everything it writes is gone
// when it returns.
func runShape(b *testing.B, f *shapeFixture, work string) shapeRun {
	b.Helper()
	fail := func(format string, args ...any) {
		b.Helper()
		b.Fatalf("shape %s: "+format, append([]any{f.name}, args...)...)
	}
	dir := filepath.Join(work, f.name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(dir)
	var r shapeRun

	// containerd: overlayfs, then kiln, each into an empty content store.
	e, err := testcontainerd.Start(testcontainerd.Options{Kiln: kilnBin})
	if errors.Is(err, testcontainerd.ErrUnavailable) {
		b.Skipf("containerd cannot run here: %v", err)
	}
	if err != nil {
		fail("starting containerd: %v", err)
	}
	defer e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	ctr := func(args ...string) time.Duration {
		b.Helper()
		start := time.Now()
		if out, err := e.Ctr(ctx, args...); err != nil {
			fail("ctr %s: %v\n%s\nkiln serve's log:\n%s", strings.Join(args, " "), err, out, lastLines(e.KilnLog(), 30))
		}
		return time.Since(start)
	}
	syncDisks(b)
	r.overlay = ctr("image", "pull", "--snapshotter", "overlayfs", f.ref)
	r.overlayDisk = diskUsage(b, e.ContainerdRoot)
	ctr("image", "rm", "--sync", f.ref)
	syncDisks(b)
	r.pull = ctr("image", "pull", "--snapshotter", "kiln", f.ref)
	out := filepath.Join(dir, "export.ext4")
	start := time.Now()
	if msg, err := exec.CommandContext(ctx, kilnBin, "export", f.ref, "-o", out, "--address", e.Address).CombinedOutput(); err != nil {
		fail("kiln export: %v\n%s", err, msg)
	}
	r.export = time.Since(start)
	// The pull built the image's disk (eagerly; the export waited for
	// it): what kiln keeps for the image from now on.
	r.kilnDisk = diskUsage(b, e.KilnRoot)
	if err := e.Close(); err != nil {
		fail("stopping containerd and kiln serve: %v", err)
	}
	os.Remove(out)

	// kiln convert, into an empty cache, then again from that cache.
	cache := filepath.Join(dir, "cache")
	for i, d := range []*time.Duration{&r.convert, &r.cached} {
		out := filepath.Join(dir, "convert"+strconv.Itoa(i)+".ext4")
		syncDisks(b)
		start := time.Now()
		args := append([]string{"convert", f.ref, "-o", out, "--cache-dir", cache}, convertFlags()...)
		msg, err := exec.CommandContext(ctx, kilnBin, args...).CombinedOutput()
		*d = time.Since(start)
		if err != nil {
			fail("kiln convert (run %d): %v\n%s", i+1, err, msg)
		}
		if i == 0 {
			r.convertSize = allocated(b, out)
		}
		os.Remove(out)
	}
	// Published by kiln push from that cache (not timed), then converted
	// into an empty cache on "another machine".
	if msg, err := exec.CommandContext(ctx, kilnBin, append([]string{"push", f.ref, "--cache-dir", cache}, convertFlags()...)...).CombinedOutput(); err != nil {
		fail("kiln push: %v\n%s", err, msg)
	}
	os.RemoveAll(cache)
	syncDisks(b)
	start = time.Now()
	args := append([]string{"convert", "--json", "--use-published", f.ref, "-o", filepath.Join(dir, "published.ext4"), "--cache-dir", cache}, convertFlags()...)
	msg, err := exec.CommandContext(ctx, kilnBin, args...).Output()
	r.published = time.Since(start)
	if err != nil || !strings.Contains(string(msg), `"fetched": true`) {
		fail("kiln convert of the published rootfs: %v (it must be fetched, not built)\n%s", err, msg)
	}
	os.Remove(filepath.Join(dir, "published.ext4"))
	os.RemoveAll(cache)

	if len(f.meta.Layers) == 1 {
		out := filepath.Join(dir, "tar2ext4.ext4")
		syncDisks(b)
		start := time.Now()
		if err := runTar2ext4(f, out); err != nil {
			fail("tar2ext4: %v", err)
		}
		r.tar2ext4 = time.Since(start)
		r.tar2ext4Size = allocated(b, out)
		os.Remove(out)
	}

	syncDisks(b)
	start = time.Now()
	n, err := decompressLayers(f)
	r.decompress = time.Since(start)
	if err != nil {
		fail("decompressing: %v", err)
	}
	if n != f.meta.uncompressed() {
		fail("the layers decompress to %d bytes, meta.json says %d", n, f.meta.uncompressed())
	}
	r.uncompressed = n
	return r
}

// convertFlags are more flags for the benchmarks' kiln convert runs, from
// KILN_BENCH_CONVERT_FLAGS (split at spaces), to compare kiln's options.
func convertFlags() []string { return strings.Fields(os.Getenv("KILN_BENCH_CONVERT_FLAGS")) }

// blobPath is where a layer blob is in f's layout.
func (f *shapeFixture) blobPath(l shapeLayer) string {
	alg, hex, _ := strings.Cut(l.Digest, ":")
	return filepath.Join(f.layout, "blobs", alg, hex)
}

// openLayer opens a layer blob of f, decompressing.
func (f *shapeFixture) openLayer(l shapeLayer) (io.Reader, func(), error) {
	fh, err := os.Open(f.blobPath(l))
	if err != nil {
		return nil, nil, err
	}
	// As kiln's layer reader decompresses (igzip where installed, as
	// containerd does).
	r, err := layer.Uncompressed(bufio.NewReaderSize(fh, 1<<20), l.MediaType)
	if err != nil {
		fh.Close()
		return nil, nil, fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	return r, func() { r.Close(); fh.Close() }, nil
}

// decompressLayers reads every layer blob of f and decompresses it to
// nothing; it returns the uncompressed bytes.
func decompressLayers(f *shapeFixture) (int64, error) {
	var total int64
	for _, l := range f.meta.Layers {
		r, done, err := f.openLayer(l)
		if err != nil {
			return total, err
		}
		n, err := io.Copy(io.Discard, r)
		done()
		if err != nil {
			return total, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		total += n
	}
	return total, nil
}

// runTar2ext4 converts f's only layer with hcsshim's tar2ext4 into out and
// syncs it, as kiln convert syncs its output.
func runTar2ext4(f *shapeFixture, out string) error {
	l := f.meta.Layers[0]
	r, done, err := f.openLayer(l)
	if err != nil {
		return err
	}
	defer done()
	w, err := os.Create(out)
	if err != nil {
		return err
	}
	defer w.Close()
	// Room for the content and its metadata, as kiln's automatic size.
	maxSize := l.Uncompressed*2 + 256<<20
	if err := tar2ext4.Convert(r, w, tar2ext4.ConvertWhiteout, tar2ext4.MaximumDiskSize(maxSize)); err != nil {
		return err
	}
	if err := w.Sync(); err != nil {
		return err
	}
	return w.Close()
}

// diskUsage is the disk the files under root take (allocated blocks,
// each inode once).
func diskUsage(t testing.TB, root string) int64 {
	t.Helper()
	seen := map[[2]uint64]bool{}
	var total int64
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		key := [2]uint64{st.Dev, st.Ino}
		if !seen[key] {
			seen[key] = true
			total += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatalf("disk use of %s: %v", root, err)
	}
	return total
}

func syncDisks(b *testing.B) {
	b.Helper()
	mustRun(b, "sync")
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// medianOf is the median of v over rs (the mean of the middle two for an
// even count).
func medianOf(rs []shapeRun, v func(shapeRun) float64) float64 {
	var xs []float64
	for _, r := range rs {
		xs = append(xs, v(r))
	}
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	if len(xs)%2 == 1 {
		return xs[len(xs)/2]
	}
	return (xs[len(xs)/2-1] + xs[len(xs)/2]) / 2
}

// shapesTable is the markdown report: the median overlayfs pull in
// seconds, the rest as ratios of medians to it; then the medians in
// seconds and disk use.
func shapesTable(fixtures []*shapeFixture, runs map[string][]shapeRun) string {
	var sb strings.Builder
	iters := 0
	for _, f := range fixtures {
		iters = max(iters, len(runs[f.name]))
	}
	fmt.Fprintf(&sb, "Image shapes: medians of %d cold iteration(s); ratios to the overlayfs pull (%d CPUs, %s)\n\n", iters, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02"))
	sb.WriteString("| shape | overlayfs pull (s) | kiln pull | kiln pull + export | kiln convert | cached convert | published convert | tar2ext4 | decompress only | kiln disk / uncompressed |\n")
	sb.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	sec := func(d time.Duration) float64 { return d.Seconds() }
	for _, f := range fixtures {
		rs := runs[f.name]
		base := medianOf(rs, func(r shapeRun) float64 { return sec(r.overlay) })
		ratio := func(v func(shapeRun) float64) string { return fmt.Sprintf("%.2f", medianOf(rs, v)/base) }
		t2e := "–"
		if len(f.meta.Layers) == 1 {
			t2e = ratio(func(r shapeRun) float64 { return sec(r.tar2ext4) })
		}
		fmt.Fprintf(&sb, "| %s: %s (%s) | %.2f | %s | %s | %s | %s | %s | %s | %s | %.2f |\n",
			f.name, f.about, mibShort(f.meta.uncompressed()), base,
			ratio(func(r shapeRun) float64 { return sec(r.pull) }),
			ratio(func(r shapeRun) float64 { return sec(r.pull + r.export) }),
			ratio(func(r shapeRun) float64 { return sec(r.convert) }),
			ratio(func(r shapeRun) float64 { return sec(r.cached) }),
			ratio(func(r shapeRun) float64 { return sec(r.published) }),
			t2e,
			ratio(func(r shapeRun) float64 { return sec(r.decompress) }),
			medianOf(rs, func(r shapeRun) float64 { return float64(r.kilnDisk) / float64(r.uncompressed) }))
	}
	sb.WriteString("\npublished convert: kiln convert into an empty cache of the rootfs kiln push published beside the image (download, verify, write).\n")
	sb.WriteString("\nkiln disk: blocks allocated under kiln serve's root once the image is pulled and its disk built (after the export), over the layer tars' uncompressed size. tar2ext4 includes reading and decompressing the blob and an fsync of its output.\n")
	sb.WriteString("\nMedians in seconds; disk in MiB (allocated blocks): containerd's root after the overlayfs pull, kiln's root once the image's disk is built, kiln convert's output, tar2ext4's output.\n\n")
	sb.WriteString("| shape | overlayfs | kiln pull | export | convert | cached | tar2ext4 | decompress | compressed | uncompressed | overlayfs disk | kiln disk | convert out | tar2ext4 out |\n")
	sb.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, f := range fixtures {
		rs := runs[f.name]
		m := func(v func(shapeRun) float64) string { return fmt.Sprintf("%.2f", medianOf(rs, v)) }
		mb := func(v func(shapeRun) int64) string {
			return fmt.Sprintf("%.0f", medianOf(rs, func(r shapeRun) float64 { return float64(v(r)) / (1 << 20) }))
		}
		t2e, t2eOut := "–", "–"
		if len(f.meta.Layers) == 1 {
			t2e = m(func(r shapeRun) float64 { return sec(r.tar2ext4) })
			t2eOut = mb(func(r shapeRun) int64 { return r.tar2ext4Size })
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s | %s | %s | %s | %.0f | %.0f | %s | %s | %s | %s |\n", f.name,
			m(func(r shapeRun) float64 { return sec(r.overlay) }),
			m(func(r shapeRun) float64 { return sec(r.pull) }),
			m(func(r shapeRun) float64 { return sec(r.export) }),
			m(func(r shapeRun) float64 { return sec(r.convert) }),
			m(func(r shapeRun) float64 { return sec(r.cached) }),
			t2e,
			m(func(r shapeRun) float64 { return sec(r.decompress) }),
			float64(f.meta.compressed())/(1<<20), float64(f.meta.uncompressed())/(1<<20),
			mb(func(r shapeRun) int64 { return r.overlayDisk }),
			mb(func(r shapeRun) int64 { return r.kilnDisk }),
			mb(func(r shapeRun) int64 { return r.convertSize }),
			t2eOut)
	}
	return sb.String()
}

func mibShort(n int64) string {
	if n >= 1<<30 {
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	}
	return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
}

// BenchmarkConvertMillion converts, with `kiln convert` from an OCI
// layout into an empty cache directory, an image of one gzip layer with
// 1,000,000 entries (1,000 directories of 999 entries: empty files, one
// in eight a small file, one in fifty a symlink), made once and cached
// under testimage.CacheDir()/images. It reports kiln's wall time and
// peak resident memory (peak-MiB, the Maxrss of its rusage).
// KILN_BENCH_CONVERT_FLAGS adds flags to kiln convert. One conversion
// took 140-250 s and 1.1 GiB at most on a 2-core machine with the
// e2fsprogs writer.
//
// The rusage comes through a small helper process (this test binary
// again, see rusageHelperEnv): Go starts children with vfork, and a
// child's Maxrss starts from the peak of the process it was started
// from, which in this test process is whatever the largest fixture took.
// The helper is fresh; its own peak is logged as the floor.
func BenchmarkConvertMillion(b *testing.B) {
	start := time.Now()
	dir, err := testimage.Cached(filepath.Join(testimage.CacheDir(), "images", "million-v1"), func(tmp string) error {
		w, err := newOCIWriter(tmp)
		if err != nil {
			return err
		}
		if err := w.tarLayer(testimage.Gzip, millionEntries); err != nil {
			return err
		}
		return w.finish()
	})
	if err != nil {
		b.Fatalf("million-entry image: %v", err)
	}
	b.Logf("million-entry image ready in %v", time.Since(start).Round(time.Millisecond))
	work := b.TempDir()
	var walls []time.Duration
	var peaks []int64
	for b.Loop() {
		out, cache := filepath.Join(work, "million.ext4"), filepath.Join(work, "cache")
		syncDisks(b)
		args := append([]string{"convert", "--json", "oci:" + dir + ":" + shapesTag, "-o", out, "--cache-dir", cache}, convertFlags()...)
		res, err := runWithRusage(kilnBin, args...)
		if err != nil {
			b.Fatalf("kiln convert of the million-entry image: %v\n%s", err, res.output)
		}
		b.Logf("kiln convert: %v, peak %d MiB (helper floor %d MiB), output %s; %s", res.wall.Round(time.Millisecond),
			res.maxRSSKiB>>10, res.helperKiB>>10, mib(allocated(b, out)), timings([]byte(res.output)))
		walls = append(walls, res.wall)
		peaks = append(peaks, res.maxRSSKiB)
		os.Remove(out)
		os.RemoveAll(cache)
	}
	b.ReportMetric(percentile(walls, 50).Seconds(), "wall-s")
	b.ReportMetric(float64(median(peaks))/1024, "peak-MiB")
}

// millionEntries writes 1,000 directories of 999 entries each.
func millionEntries(g *tarGen) error {
	for d := 0; d < 1000; d++ {
		dir := fmt.Sprintf("d%03d", d)
		for i := 0; i < 999; i++ {
			name := fmt.Sprintf("%s/e%03d", dir, i)
			var err error
			switch {
			case i%50 == 49:
				err = g.symlink(name, "../d000/e000")
			case i%8 == 7:
				err = g.file(name, int64(1+i%64), 0)
			default:
				err = g.file(name, 0, 0)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// rusageHelperEnv, set to a file name, makes this test binary run its
// arguments as a command and write the command's rusage there (see
// BenchmarkConvertMillion).
const rusageHelperEnv = "KILN_BENCH_RUSAGE_OUT"

func init() {
	if out := os.Getenv(rusageHelperEnv); out != "" {
		os.Exit(rusageHelper(out, os.Args[1:]))
	}
}

type rusageResult struct {
	MaxRSSKiB int64 `json:"maxrss_kib"`
	HelperKiB int64 `json:"helper_kib"`
	WallNS    int64 `json:"wall_ns"`
}

func rusageHelper(out string, args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "rusage helper: no command")
		return 2
	}
	// What the child may inherit as its starting peak: this process's.
	helper := int64(0)
	if status, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
				helper, _ = strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			}
		}
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, rusageHelperEnv+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	start := time.Now()
	err := cmd.Run()
	wall := time.Since(start)
	if cmd.ProcessState == nil {
		fmt.Fprintf(os.Stderr, "rusage helper: %v\n", err)
		return 127
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	res := rusageResult{HelperKiB: helper, WallNS: int64(wall)}
	if ru != nil {
		res.MaxRSSKiB = ru.Maxrss
	}
	data, _ := json.Marshal(res)
	if err := os.WriteFile(out, data, 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "rusage helper: %v\n", err)
		return 125
	}
	return cmd.ProcessState.ExitCode()
}

type rusageRun struct {
	output               string
	wall                 time.Duration
	maxRSSKiB, helperKiB int64
}

// runWithRusage runs name with args through the rusage helper and returns
// the command's output, wall time and peak resident memory.
func runWithRusage(name string, args ...string) (rusageRun, error) {
	self, err := os.Executable()
	if err != nil {
		return rusageRun{}, err
	}
	f, err := os.CreateTemp("", "kiln-rusage-")
	if err != nil {
		return rusageRun{}, err
	}
	f.Close()
	defer os.Remove(f.Name())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, append([]string{name}, args...)...)
	cmd.Env = append(os.Environ(), rusageHelperEnv+"="+f.Name())
	out, err := cmd.CombinedOutput()
	res := rusageRun{output: string(out)}
	if err != nil {
		return res, err
	}
	data, err := os.ReadFile(f.Name())
	if err != nil {
		return res, err
	}
	var rr rusageResult
	if err := json.Unmarshal(data, &rr); err != nil {
		return res, fmt.Errorf("rusage helper wrote %q: %w", data, err)
	}
	res.wall, res.maxRSSKiB, res.helperKiB = time.Duration(rr.WallNS), rr.MaxRSSKiB, rr.HelperKiB
	return res, nil
}

// ociWriter writes an OCI image layout one layer at a time, streaming:
// no layer is held in memory.
type ociWriter struct {
	dir    string
	layers []shapeLayer
	cmd    []string
}

func newOCIWriter(dir string) (*ociWriter, error) {
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return nil, err
	}
	return &ociWriter{dir: dir, cmd: []string{"/bin/sh"}}, nil
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// rawLayer adds a layer whose uncompressed tar write writes.
func (w *ociWriter) rawLayer(comp testimage.Compression, write func(io.Writer) error) error {
	tmp, err := os.CreateTemp(filepath.Join(w.dir, "blobs", "sha256"), ".layer-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	blobHash, blobCount := sha256.New(), &countWriter{}
	blobOut := bufio.NewWriterSize(io.MultiWriter(tmp, blobHash, blobCount), 1<<20)
	var zw io.WriteCloser
	mediaType := types.OCILayer
	switch comp {
	case testimage.Zstd:
		if zw, err = zstd.NewWriter(blobOut); err != nil {
			return err
		}
		mediaType = types.OCILayerZStd
	case testimage.Gzip, "":
		if zw, err = gzip.NewWriterLevel(blobOut, gzip.DefaultCompression); err != nil {
			return err
		}
	default:
		return fmt.Errorf("compression %q: not for these images", comp)
	}
	diffHash, diffCount := sha256.New(), &countWriter{}
	tarOut := bufio.NewWriterSize(io.MultiWriter(zw, diffHash, diffCount), 1<<20)
	if err := write(tarOut); err != nil {
		return err
	}
	if err := tarOut.Flush(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := blobOut.Flush(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	digest := hex.EncodeToString(blobHash.Sum(nil))
	if err := os.Rename(tmp.Name(), filepath.Join(w.dir, "blobs", "sha256", digest)); err != nil {
		return err
	}
	w.layers = append(w.layers, shapeLayer{
		MediaType: string(mediaType), Digest: "sha256:" + digest, Size: blobCount.n,
		DiffID: "sha256:" + hex.EncodeToString(diffHash.Sum(nil)), Uncompressed: diffCount.n,
	})
	return nil
}

// tarLayer adds a layer whose entries fill writes.
func (w *ociWriter) tarLayer(comp testimage.Compression, fill func(*tarGen) error) error {
	return w.rawLayer(comp, func(out io.Writer) error {
		tw := tar.NewWriter(out)
		if err := fill(&tarGen{tw: tw, dirs: map[string]bool{}}); err != nil {
			return err
		}
		return tw.Close()
	})
}

func (w *ociWriter) blob(data []byte) (string, error) {
	sum := sha256.Sum256(data)
	h := hex.EncodeToString(sum[:])
	return "sha256:" + h, os.WriteFile(filepath.Join(w.dir, "blobs", "sha256", h), data, 0o644)
}

// finish writes the config, the manifest and index.json (tag shapesTag).
func (w *ociWriter) finish() error {
	var diffIDs []string
	var layers []map[string]any
	for _, l := range w.layers {
		diffIDs = append(diffIDs, l.DiffID)
		layers = append(layers, map[string]any{"mediaType": l.MediaType, "digest": l.Digest, "size": l.Size})
	}
	cfg, _ := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Cmd": w.cmd},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	cfgDigest, err := w.blob(cfg)
	if err != nil {
		return err
	}
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIManifestSchema1,
		"config":        map[string]any{"mediaType": types.OCIConfigJSON, "digest": cfgDigest, "size": len(cfg)},
		"layers":        layers,
	})
	mDigest, err := w.blob(manifest)
	if err != nil {
		return err
	}
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIImageIndex,
		"manifests": []map[string]any{{
			"mediaType":   types.OCIManifestSchema1,
			"digest":      mDigest,
			"size":        len(manifest),
			"annotations": map[string]string{"org.opencontainers.image.ref.name": shapesTag},
		}},
	})
	return os.WriteFile(filepath.Join(w.dir, "index.json"), index, 0o644)
}

// tarGen writes one layer's entries: root-owned, dated shapeTime, with
// file contents that depend only on the path and a version, so that a
// later layer can copy a file up unchanged.
type tarGen struct {
	tw   *tar.Writer
	dirs map[string]bool // written in this layer
	buf  []byte
}

var shapeTime = time.Unix(1700000000, 0)

// dir writes name and its parents, once per layer.
func (g *tarGen) dir(name string) error {
	if name == "." || name == "" || g.dirs[name] {
		return nil
	}
	if err := g.dir(path.Dir(name)); err != nil {
		return err
	}
	g.dirs[name] = true
	return g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755, ModTime: shapeTime})
}

// file writes a regular file of size bytes, content version ver.
func (g *tarGen) file(name string, size int64, ver int) error {
	if err := g.dir(path.Dir(name)); err != nil {
		return err
	}
	if err := g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: shapeTime}); err != nil {
		return err
	}
	if size == 0 {
		return nil
	}
	if g.buf == nil {
		g.buf = make([]byte, 1<<20)
	}
	c := newContent(name, ver)
	for left := size; left > 0; {
		n := min(left, int64(len(g.buf)))
		c.fill(g.buf[:n])
		if _, err := g.tw.Write(g.buf[:n]); err != nil {
			return err
		}
		left -= n
	}
	return nil
}

func (g *tarGen) link(name, target string) error {
	if err := g.dir(path.Dir(name)); err != nil {
		return err
	}
	return g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: shapeTime})
}

func (g *tarGen) symlink(name, target string) error {
	if err := g.dir(path.Dir(name)); err != nil {
		return err
	}
	return g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: shapeTime})
}

// whiteout removes name of the layers below (".wh..wh..opq" as the base
// name makes its directory opaque).
func (g *tarGen) whiteout(name string) error {
	dir, base := path.Split(name)
	if base != ".wh..wh..opq" {
		base = ".wh." + base
	}
	if err := g.dir(path.Clean(dir)); err != nil {
		return err
	}
	return g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path.Join(dir, base), Mode: 0o644, ModTime: shapeTime})
}

// shapeText is 1 MiB of words; file contents are half random bytes,
// half slices of it, so that gzip does real work (about 2:3).
var shapeText = func() []byte {
	rng := rand.New(rand.NewPCG(1, 2))
	const letters = "abcdefghijklmnopqrstuvwxyz"
	var words []string
	for i := 0; i < 512; i++ {
		w := make([]byte, 2+rng.IntN(9))
		for j := range w {
			w[j] = letters[rng.IntN(len(letters))]
		}
		words = append(words, string(w))
	}
	var b []byte
	for len(b) < 1<<20 {
		b = append(b, words[rng.IntN(len(words))]...)
		if rng.IntN(12) == 0 {
			b = append(b, ".\n"...)
		} else {
			b = append(b, ' ')
		}
	}
	return b[:1<<20]
}()

// fileContent is a deterministic stream of file content.
type fileContent struct{ rng *rand.ChaCha8 }

func newContent(name string, ver int) *fileContent {
	seed := sha256.Sum256([]byte(name + "\x00" + strconv.Itoa(ver)))
	return &fileContent{rng: rand.NewChaCha8(seed)}
}

func (c *fileContent) fill(b []byte) {
	for off := 0; off < len(b); off += 4096 {
		end := min(off+4096, len(b))
		mid := min(off+2048, end)
		c.rng.Read(b[off:mid])
		if n := end - mid; n > 0 {
			o := int(c.rng.Uint64() % uint64(len(shapeText)-n))
			copy(b[mid:end], shapeText[o:o+n])
		}
	}
}

// sizeOf is a deterministic size below limit for name.
func sizeOf(name string, limit int64) int64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return int64(h.Sum64() % uint64(limit))
}

func minbaseShape(comp testimage.Compression) func(*ociWriter) error {
	return func(w *ociWriter) error {
		tarPath, err := testimage.MinbaseTar()
		if err != nil {
			return err
		}
		return w.rawLayer(comp, func(out io.Writer) error {
			f, err := os.Open(tarPath)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(out, f)
			return err
		})
	}
}

// layers9Shape: a base layer and eight more that add files, rewrite and
// delete files of the layers below, link to files of the layers below
// (copied up into the linking layer, as overlayfs and docker build do),
// make a directory opaque, delete a directory and make it again, and
// replace a symlink.
func layers9Shape(w *ociWriter) error {
	base := func(g *tarGen) error {
		for d := 0; d < 30; d++ {
			for i := 0; i < 60; i++ {
				name := fmt.Sprintf("base/a%02d/f%03d", d, i)
				if err := g.file(name, sizeOf(name, 64<<10), 0); err != nil {
					return err
				}
			}
		}
		for i := 0; i < 200; i++ {
			name := fmt.Sprintf("opq/f%03d", i)
			if err := g.file(name, sizeOf(name, 32<<10), 0); err != nil {
				return err
			}
		}
		for s := 0; s < 3; s++ {
			for i := 0; i < 100; i++ {
				name := fmt.Sprintf("gone/s%d/f%03d", s, i)
				if err := g.file(name, sizeOf(name, 16<<10), 0); err != nil {
					return err
				}
			}
		}
		for i := 0; i < 100; i++ {
			name := fmt.Sprintf("links/t%03d", i)
			if err := g.file(name, sizeOf(name, 16<<10), 0); err != nil {
				return err
			}
			if err := g.link(name+".hl", name); err != nil {
				return err
			}
		}
		return g.symlink("current", "base/a00")
	}
	if err := w.tarLayer(testimage.Gzip, base); err != nil {
		return fmt.Errorf("layer 1: %w", err)
	}
	for k := 1; k <= 8; k++ {
		upper := func(g *tarGen) error {
			for i := 0; i < 300; i++ {
				name := fmt.Sprintf("layer%d/f%03d", k, i)
				if err := g.file(name, sizeOf(name, 128<<10), 0); err != nil {
					return err
				}
			}
			// Rewrite 20 files of the base, delete 20 others.
			for i := 0; i < 20; i++ {
				name := fmt.Sprintf("base/a%02d/f%03d", k, i)
				if err := g.file(name, sizeOf(name+"#", 64<<10), k); err != nil {
					return err
				}
				if err := g.whiteout(fmt.Sprintf("base/a%02d/f%03d", k+10, i)); err != nil {
					return err
				}
			}
			// Hard links to 10 files of the layer below, copied up.
			for i := 0; i < 10; i++ {
				target, limit := fmt.Sprintf("layer%d/f%03d", k-1, i), int64(128<<10)
				if k == 1 {
					target, limit = fmt.Sprintf("base/a00/f%03d", i), 64<<10
				}
				if err := g.file(target, sizeOf(target, limit), 0); err != nil {
					return err
				}
				if err := g.link(fmt.Sprintf("links/l%d-%03d", k, i), target); err != nil {
					return err
				}
			}
			// Of the base's linked pairs, delete one name of five and
			// rewrite one name of five others.
			for i := k * 10; i < k*10+5; i++ {
				if err := g.whiteout(fmt.Sprintf("links/t%03d.hl", i)); err != nil {
					return err
				}
				name := fmt.Sprintf("links/t%03d", i+5)
				if err := g.file(name, sizeOf(name, 16<<10), k); err != nil {
					return err
				}
			}
			switch k {
			case 3:
				if err := g.whiteout("opq/.wh..wh..opq"); err != nil {
					return err
				}
				for i := 0; i < 50; i++ {
					name := fmt.Sprintf("opq/n%03d", i)
					if err := g.file(name, sizeOf(name, 32<<10), k); err != nil {
						return err
					}
				}
			case 5:
				if err := g.whiteout("gone"); err != nil {
					return err
				}
			case 7:
				for i := 0; i < 10; i++ {
					if err := g.file(fmt.Sprintf("gone/again%02d", i), 4096, k); err != nil {
						return err
					}
				}
			case 8:
				if err := g.symlink("current", "layer8"); err != nil {
					return err
				}
			}
			return nil
		}
		if err := w.tarLayer(testimage.Gzip, upper); err != nil {
			return fmt.Errorf("layer %d: %w", k+1, err)
		}
	}
	return nil
}

// files100kShape: 100 directories of 500 files and 5 of 10,000, up to
// 2 KiB each, one in ten empty.
func files100kShape(w *ociWriter) error {
	return w.tarLayer(testimage.Gzip, func(g *tarGen) error {
		write := func(name string, limit int64, i int) error {
			size := sizeOf(name, limit)
			if i%10 == 0 {
				size = 0
			}
			return g.file(name, size, 0)
		}
		for d := 0; d < 100; d++ {
			for i := 0; i < 500; i++ {
				if err := write(fmt.Sprintf("many/d%03d/f%03d", d, i), 2048, i); err != nil {
					return err
				}
			}
		}
		for d := 0; d < 5; d++ {
			for i := 0; i < 10000; i++ {
				if err := write(fmt.Sprintf("wide/w%d/file-%05d.dat", d, i), 1024, i); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// bigFileShape: one 1 GiB file and a few small ones.
func bigFileShape(w *ociWriter) error {
	return w.tarLayer(testimage.Gzip, func(g *tarGen) error {
		if err := g.file("etc/hostname", 6, 0); err != nil {
			return err
		}
		return g.file("data/big.bin", 1<<30, 0)
	})
}
