package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
)

// The tests in this file run many requests at once against one kiln
// serve, built with the race detector, next to a real containerd: pulls
// of images sharing a base layer, containers prepared on one image, and
// exports during a pull. Every disk must be what kiln convert writes,
// every call must return within its deadline, and work the images share
// must be done once.

// concDeadline bounds each concurrent phase: a deadlock fails the test
// instead of hanging it.
const concDeadline = 90 * time.Second

var raceKilnBin struct {
	once sync.Once
	path string
	err  error
}

// raceKiln returns kiln built with the race detector, or the plain
// binary when this toolchain cannot build one (the race detector needs
// cgo and a C compiler).
func raceKiln(t *testing.T) string {
	t.Helper()
	raceKilnBin.once.Do(func() {
		start := time.Now()
		p := filepath.Join(sharedDir, "kiln-race")
		out, err := exec.Command(goTool(), "build", "-race", "-o", p, "github.com/kilnfs/kiln/cmd/kiln").CombinedOutput()
		if err != nil {
			raceKilnBin.err = fmt.Errorf("%v\n%s", err, out)
			return
		}
		raceKilnBin.path = p
		fmt.Fprintf(os.Stderr, "built kiln with the race detector in %v\n", time.Since(start).Round(time.Millisecond))
	})
	if raceKilnBin.err != nil {
		t.Logf("kiln serve runs without the race detector, which cannot be built here: %v", raceKilnBin.err)
		return kilnBin
	}
	return raceKilnBin.path
}

// startRaceContainerd starts containerd, unpacking up to eight layers at
// once, and kiln serve built with the race detector, with metrics. When
// the test ends kiln is stopped first, and a data race it reported fails
// the test.
func startRaceContainerd(t *testing.T) *testcontainerd.Env {
	t.Helper()
	e := startContainerd(t, testcontainerd.Options{Kiln: raceKiln(t), Metrics: true, MaxConcurrentUnpacks: 8})
	t.Cleanup(func() {
		err := e.StopKiln()
		logs := e.KilnLogs()
		if i := strings.Index(logs, "WARNING: DATA RACE"); i >= 0 {
			report, _, _ := strings.Cut(logs[i:], "==================")
			t.Errorf("kiln serve ran into a data race (the first of %d):\n%s",
				strings.Count(logs, "WARNING: DATA RACE"), report[:min(len(report), 8000)])
		} else if err != nil {
			t.Errorf("kiln serve did not stop cleanly: %v", err)
		}
	})
	return e
}

// concBaseLayer is the layer the images of these tests share: a few
// hundred files in nested directories, a hard link, a symlink and a
// file of 1 MiB.
func concBaseLayer(t *testing.T) []byte {
	t.Helper()
	entries := []tarEntry{tDir("srv", 0o755, ctdT1)}
	for d := range 8 {
		dir := fmt.Sprintf("srv/d%d", d)
		entries = append(entries, tDir(dir, 0o755, ctdT1))
		for f := range 40 {
			entries = append(entries, tFile(fmt.Sprintf("%s/f%d", dir, f), 0o644, ctdT1, strings.Repeat(dir, f)))
		}
	}
	entries = append(entries,
		tFile("srv/big", 0o644, ctdT1, strings.Repeat("0123456789abcdef", 1<<16)),
		tHardlink("srv/big-link", "srv/big", ctdT1),
		tSymlink("srv/current", "d3", ctdT1),
	)
	return layerTar(t, entries...)
}

// concTopLayer is image i's own layer over the base: a file of its own,
// a base file changed and one deleted.
func concTopLayer(t *testing.T, i int) []byte {
	t.Helper()
	return layerTar(t,
		tDir("etc", 0o755, ctdT2),
		tFile("etc/image", 0o644, ctdT2, fmt.Sprintf("image %d\n", i)),
		tDir("srv/d1", 0o700, ctdT2),
		tFile("srv/d1/f1", 0o600, ctdT2, fmt.Sprintf("changed by image %d\n", i)),
		tWhiteout(fmt.Sprintf("srv/d2/.wh.f%d", i), ctdT2),
	)
}

// concImage is a pushed image and what kiln convert writes for it.
type concImage struct {
	ref     string
	img     v1.Image
	convert string
}

// concImages pushes n images made of the shared base and a layer of
// their own, and converts each with kiln convert.
func concImages(t *testing.T, repo string, base []byte, n int) []concImage {
	t.Helper()
	dir := t.TempDir()
	out := make([]concImage, n)
	for i := range out {
		img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: base}, {Tar: concTopLayer(t, i)}}})
		ref := mustPush(t, fmt.Sprintf("%s:v%d", repo, i), img)
		want := filepath.Join(dir, fmt.Sprintf("convert-%d.ext4", i))
		convert(t, ref, want, filepath.Join(dir, "cache"))
		out[i] = concImage{ref: ref, img: img, convert: want}
	}
	return out
}

// concPull pulls ref into namespace ns with the kiln snapshotter through
// containerd's transfer service.
func concPull(ctx context.Context, e *testcontainerd.Env, ns, ref string) error {
	if out, err := e.Ctr(ctx, ctdPullArgs(ns, ref, false)...); err != nil {
		return fmt.Errorf("pull %s into %s: %w\n%s", ref, ns, err, ctdTail(out, 2000))
	}
	return nil
}

// concExport runs kiln export of ref in namespace ns to out.
func concExport(ctx context.Context, e *testcontainerd.Env, ns, ref, out string) error {
	cmd := exec.CommandContext(ctx, kilnBin, "export", ref, "-o", out, "--namespace", ns, "--address", e.Address)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kiln export %s from %s: %w\n%s", ref, ns, err, msg)
	}
	return nil
}

// concSameAsConvert fails the test unless the exported disk passes
// e2fsck -fn and has the bytes kiln convert wrote.
func concSameAsConvert(t *testing.T, exported string, im concImage) {
	t.Helper()
	fsck(t, exported)
	if got, want := fileSHA(t, exported), fileSHA(t, im.convert); got != want {
		t.Errorf("%s: kiln export of %s has sha256 %s, kiln convert wrote %s", exported, im.ref, got, want)
	}
}

// concAll runs fn(i) for i in [0, n) at once, with parent's values and
// a deadline of concDeadline, and returns their errors; the test fails
// if they are not all done by then.
func concAll(t *testing.T, parent context.Context, what string, n int, fn func(ctx context.Context, i int) error) []error {
	t.Helper()
	ctx, cancel := context.WithTimeout(parent, concDeadline)
	defer cancel()
	start := time.Now()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(ctx, i)
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		t.Errorf("%d concurrent %s were not done within %v: a deadlock?", n, what, concDeadline)
	}
	t.Logf("%d concurrent %s took %v", n, what, time.Since(start).Round(time.Millisecond))
	return errs
}

// concMetric returns the value of a sample in kiln's metrics, by its
// name and labels as exposed ("kiln_x_total", `kiln_y{class="urgent"}`),
// or -1 if there is none.
func concMetric(t *testing.T, metrics, sample string) float64 {
	t.Helper()
	for _, l := range strings.Split(metrics, "\n") {
		if v, ok := strings.CutPrefix(l, sample+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("metric %s: %v", l, err)
			}
			return f
		}
	}
	return -1
}

var builtDiskLog = regexp.MustCompile(`msg="built disk".* snapshot=(\S+)`)

// concBuiltOnce fails the test if kiln built the disk of a snapshot more
// than once, or if a build failed, and returns how many disks it built.
func concBuiltOnce(t *testing.T, e *testcontainerd.Env) int {
	t.Helper()
	built := map[string]int{}
	for _, m := range builtDiskLog.FindAllStringSubmatch(e.KilnLogs(), -1) {
		built[m[1]]++
	}
	t.Logf("kiln built %d disks", len(built))
	for id, n := range built {
		if n > 1 {
			t.Errorf("the disk of snapshot %s was built %d times", id, n)
		}
	}
	metrics := ctdMetrics(t, e)
	if n := concMetric(t, metrics, "kiln_disk_build_seconds_count"); n != float64(len(built)) {
		t.Errorf("kiln_disk_build_seconds_count is %v, the log says %d disks were built", n, len(built))
	}
	if n := concMetric(t, metrics, "kiln_disk_build_errors_total"); n != 0 {
		t.Errorf("kiln_disk_build_errors_total is %v, want 0", n)
	}
	return len(built)
}

// TestConcurrentPullsShareBase pulls eight images sharing a base layer
// at once into one namespace, then exports them all at once. containerd
// unpacks the shared layer once; kiln must store it once, build each
// image's disk once and give the bytes kiln convert gives.
func TestConcurrentPullsShareBase(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	const n = 8
	base := concBaseLayer(t)
	images := concImages(t, "conc/shared", base, n)
	e := startRaceContainerd(t)
	const ns = "conc-pulls"

	for i, err := range concAll(t, context.Background(), "pulls", n, func(ctx context.Context, i int) error {
		return concPull(ctx, e, ns, images[i].ref)
	}) {
		if err != nil {
			t.Errorf("image %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	dir := t.TempDir()
	for i, err := range concAll(t, context.Background(), "exports", n, func(ctx context.Context, i int) error {
		return concExport(ctx, e, ns, images[i].ref, filepath.Join(dir, fmt.Sprintf("export-%d.ext4", i)))
	}) {
		if err != nil {
			t.Errorf("image %d: %v", i, err)
			continue
		}
		concSameAsConvert(t, filepath.Join(dir, fmt.Sprintf("export-%d.ext4", i)), images[i])
	}

	// Each distinct layer was stored once: the base and eight tops.
	metrics := ctdMetrics(t, e)
	wantBytes := len(base)
	for i := range n {
		wantBytes += len(concTopLayer(t, i))
	}
	if got := concMetric(t, metrics, "kiln_layer_apply_seconds_count"); got != n+1 {
		t.Errorf("kiln stored %v layers, want %d: the shared base once and each image's own layer", got, n+1)
	}
	if got := concMetric(t, metrics, "kiln_layer_apply_bytes_total"); got != float64(wantBytes) {
		t.Errorf("kiln stored %v bytes of layers, want %d, each distinct layer once", got, wantBytes)
	}
	if got := concMetric(t, metrics, "kiln_layer_apply_errors_total"); got != 0 {
		t.Errorf("kiln_layer_apply_errors_total is %v, want 0", got)
	}
	// One disk per image (and perhaps the base's, built ahead of need).
	if built := concBuiltOnce(t, e); built < n || built > n+1 {
		t.Errorf("kiln built %d disks for %d images sharing a base, want one per image", built, n)
	}
	ctdCheckLeftovers(t, e, ns)
}

// TestConcurrentPrepares prepares 50 containers at once on an image just
// pulled, whose disk may still be building. They must all get the one
// disk, built once, and a scratch disk of their own; removing them all
// at once leaves nothing of them.
func TestConcurrentPrepares(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	const n = 50
	im := concImages(t, "conc/prepare", concBaseLayer(t), 1)[0]
	chain := ctdChainID(t, im.img)
	e := startRaceContainerd(t)
	const ns = "conc-prepare"
	ctx, cancel := context.WithTimeout(context.Background(), concDeadline)
	defer cancel()
	if err := concPull(ctx, e, ns, im.ref); err != nil {
		t.Fatal(err)
	}
	client, cctx := ctdClient(t, e, ns)
	// A lease keeps containerd's garbage collection off the containers.
	cctx, done, err := client.WithLease(cctx)
	if err != nil {
		t.Fatal(err)
	}
	defer done(context.Background()) //nolint:errcheck // containerd stops with the test
	sn := client.SnapshotService("kiln")

	mounts := make([][]mount.Mount, n)
	for i, err := range concAll(t, cctx, "prepares", n, func(ctx context.Context, i int) (err error) {
		mounts[i], err = sn.Prepare(ctx, fmt.Sprintf("c%d", i), chain)
		return err
	}) {
		if err != nil {
			t.Errorf("prepare c%d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if len(mounts[0]) != 3 {
		t.Fatalf("c0: mounts %+v, want a scratch disk, the image's disk and an overlay of them", mounts[0])
	}
	disk := mounts[0][1].Source
	scratches := map[string]bool{}
	for i, m := range mounts {
		if len(m) != 3 || m[1].Source != disk {
			t.Errorf("c%d: mounts %+v, want a scratch disk over the shared %s", i, m, disk)
			continue
		}
		if scratches[m[0].Source] {
			t.Errorf("c%d shares its scratch disk %s", i, m[0].Source)
		}
		scratches[m[0].Source] = true
		fsck(t, m[0].Source)
	}
	exported := filepath.Join(t.TempDir(), "export.ext4")
	if err := concExport(ctx, e, ns, im.ref, exported); err != nil {
		t.Fatal(err)
	}
	concSameAsConvert(t, exported, im)
	if built := concBuiltOnce(t, e); built != 1 {
		t.Errorf("kiln built %d disks for one single-layer image, want 1", built)
	}
	metrics := ctdMetrics(t, e)
	if got := concMetric(t, metrics, `kiln_containers{mode="overlay"}`); got != n {
		t.Errorf("kiln_containers{mode=\"overlay\"} is %v, want %d", got, n)
	}

	for i, err := range concAll(t, cctx, "removes", n, func(ctx context.Context, i int) error {
		return sn.Remove(ctx, fmt.Sprintf("c%d", i))
	}) {
		if err != nil {
			t.Errorf("remove c%d: %v", i, err)
		}
	}
	// containerd removes them from kiln in its garbage collection.
	ctdEventually(t, "removed containers' scratch disks left", func() []string {
		var left []string
		for s := range scratches {
			if _, err := os.Stat(s); !errors.Is(err, os.ErrNotExist) {
				left = append(left, s)
			}
		}
		return left
	})
}

// TestConcurrentExportDuringPull exports an image while it is being
// pulled: into a second namespace, exporting from there as soon as the
// pull has stored the image (its disk likely still being built ahead of
// need), and again into the first namespace, where the pull just before
// left its disk building and three exports run at once.
func TestConcurrentExportDuringPull(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	im := concImages(t, "conc/export", concBaseLayer(t), 1)[0]
	e := startRaceContainerd(t)
	ctx, cancel := context.WithTimeout(context.Background(), concDeadline)
	defer cancel()
	if err := concPull(ctx, e, "first", im.ref); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	out := func(i int) string { return filepath.Join(dir, fmt.Sprintf("export-%d.ext4", i)) }
	const exports = 3
	errs := concAll(t, context.Background(), "exports and pulls", exports+3, func(ctx context.Context, i int) error {
		switch {
		case i < exports:
			return concExport(ctx, e, "first", im.ref, out(i))
		case i == exports:
			return concPull(ctx, e, "first", im.ref)
		case i == exports+1:
			return concPull(ctx, e, "second", im.ref)
		}
		// The second namespace has the image once its pull is done.
		for {
			err := concExport(ctx, e, "second", im.ref, out(i))
			if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "not found") && !strings.Contains(err.Error(), "not unpacked") {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	for i, err := range errs {
		if err != nil {
			t.Errorf("call %d: %v", i, err)
		} else if i != exports && i != exports+1 {
			concSameAsConvert(t, out(i), im)
		}
	}
	// One disk for each namespace's snapshots of the image.
	if built := concBuiltOnce(t, e); built < 2 {
		t.Errorf("kiln built %d disks, want one in each namespace", built)
	}
	for _, ns := range []string{"first", "second"} {
		ctdCheckLeftovers(t, e, ns)
	}
}
