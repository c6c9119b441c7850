package integration

import (
	"context"
	"errors"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kilnfs/kiln/integration/testcontainerd"
)

// BenchmarkPullMinbase pulls the debootstrap minbase image from a registry
// on 127.0.0.1 through containerd's transfer service into kiln and, in the
// same run and the same containerd, into containerd's overlayfs. It
// reports kiln's pull and its pull plus `kiln export` as ratios of the
// overlayfs pull (targets: ≤ 1.0 and ≤ 1.3). Each pull starts from an
// empty content store: the image is removed and garbage collected between
// pulls. Set TMPDIR to a dedicated filesystem for steadier numbers.
func BenchmarkPullMinbase(b *testing.B) {
	ref := minbaseRef(b)
	e := benchContainerd(b)
	ctx := context.Background()
	ctr := func(args ...string) time.Duration {
		b.Helper()
		start := time.Now()
		if out, err := e.Ctr(ctx, args...); err != nil {
			b.Fatalf("ctr %v: %v\n%s", args, err, out)
		}
		return time.Since(start)
	}
	clean := func() {
		b.StopTimer()
		ctr("image", "rm", "--sync", ref)
		mustRun(b, "sync")
		b.StartTimer()
	}
	out := b.TempDir()
	var overlay, pull, export time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		overlay += ctr("image", "pull", "--snapshotter", "overlayfs", ref)
		clean()
		pull += ctr("image", "pull", "--snapshotter", "kiln", ref)
		start := time.Now()
		mustRun(b, kilnBin, "export", ref, "-o", filepath.Join(out, strconv.Itoa(i)+".ext4"), "--address", e.Address)
		export += time.Since(start)
		clean()
	}
	n := float64(b.N)
	b.ReportMetric(overlay.Seconds()/n, "overlayfs-s")
	b.ReportMetric(pull.Seconds()/n, "kiln-pull-s")
	b.ReportMetric((pull+export).Seconds()/n, "kiln-pull+export-s")
	b.ReportMetric(pull.Seconds()/overlay.Seconds(), "pull/overlayfs")
	b.ReportMetric((pull+export).Seconds()/overlay.Seconds(), "pull+export/overlayfs")
}

// benchContainerd starts containerd and kiln serve for a benchmark,
// stopped when it ends.
func benchContainerd(b *testing.B) *testcontainerd.Env {
	b.Helper()
	e, err := testcontainerd.Start(testcontainerd.Options{Kiln: kilnBin})
	if errors.Is(err, testcontainerd.ErrUnavailable) {
		b.Skipf("containerd cannot run here: %v", err)
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return e
}
