package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/kilnfs/kiln/integration/testimage"
)

// BenchmarkContainerPrepare prepares containers through containerd's
// snapshot API on a pulled image holding one 1 GiB file (no block of it
// zero), in each container mode, and reports the median and 90th
// percentile time of a Prepare and the disk a container takes before it
// writes anything (target for overlay mode: p50 ≤ 20 ms, ≤ 1 MiB).
// Overlay mode keeps all 100 containers; copy mode, which copies the
// image's data, removes each of its 20 after measuring it.
func BenchmarkContainerPrepare(b *testing.B) {
	dir := b.TempDir()
	tarPath, _ := bigFileLayer(b, dir, 1<<30)
	img := mustBuild(b, testimage.Image{Layers: []testimage.Layer{{File: tarPath}}})
	ref := mustPush(b, "bench/big:v1", img)
	e := benchContainerd(b)
	const ns = "bench"
	if out, err := e.Ctr(context.Background(), "-n", ns, "image", "pull", "--snapshotter", "kiln", ref); err != nil {
		b.Fatalf("pull: %v\n%s", err, out)
	}
	client, ctx := ctdClient(b, e, ns)
	// A lease keeps containerd's garbage collection off the containers.
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer done(context.Background()) //nolint:errcheck // containerd is stopped anyway
	sn := client.SnapshotService("kiln")
	chain := ctdChainID(b, img)
	// The disk is built once, before the first container.
	if _, err := sn.View(ctx, "warm", chain); err != nil {
		b.Fatal(err)
	}

	runs := map[string]int{"overlay": 100, "copy": 20}
	lat := map[string][]time.Duration{}
	disk := map[string][]int64{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, mode := range []string{"overlay", "copy"} {
			var keys []string
			for j := 0; j < runs[mode]; j++ {
				key := fmt.Sprintf("%s-%d-%d", mode, i, j)
				start := time.Now()
				mounts, err := sn.Prepare(ctx, key, chain, snapshots.WithLabels(map[string]string{
					"containerd.io/snapshot/kiln.container-mode": mode,
				}))
				lat[mode] = append(lat[mode], time.Since(start))
				if err != nil {
					b.Fatalf("prepare %s: %v", key, err)
				}
				disk[mode] = append(disk[mode], allocated(b, mounts[0].Source))
				keys = append(keys, key)
				if mode == "copy" {
					if err := sn.Remove(ctx, key); err != nil {
						b.Fatal(err)
					}
					keys = keys[:0]
				}
			}
			for _, key := range keys {
				if err := sn.Remove(ctx, key); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.StopTimer()
	for _, mode := range []string{"overlay", "copy"} {
		p50, p90 := percentile(lat[mode], 50), percentile(lat[mode], 90)
		b.ReportMetric(float64(p50.Microseconds())/1000, mode+"-p50-ms")
		b.ReportMetric(float64(p90.Microseconds())/1000, mode+"-p90-ms")
		b.ReportMetric(float64(median(disk[mode]))/(1<<20), mode+"-MiB/container")
	}
}

func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func median(v []int64) int64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// allocated is the disk a file takes, holes excluded.
func allocated(t testing.TB, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Clean(p), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
