package integration

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
)

// BenchmarkConvertMinbase converts the debootstrap minbase image from a
// registry on 127.0.0.1 and, in the same run, the plain pipeline kiln
// replaces: `gzip -dc layer | tar -x` into a directory, then `mkfs.ext4
// -d`. It reports the ratios (targets: cold ≤ 1.2, cached ≤ 0.1). The
// machines are shared and noisy, so only the ratios of one run mean
// anything; set TMPDIR to a dedicated filesystem for steadier numbers.
func BenchmarkConvertMinbase(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: the minbase image is made with debootstrap")
	}
	layerTar, err := testimage.MinbaseTar()
	if err != nil {
		b.Fatal(err)
	}
	img, err := testimage.Build(testimage.Image{Layers: []testimage.Layer{{File: layerTar}}})
	if err != nil {
		b.Fatal(err)
	}
	ref := reg.Host + "/bench/minbase:v1"
	if err := testimage.Push(ref, img); err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()
	blob := filepath.Join(work, "layer.tar.gz")
	if err := writeLayerBlob(img, blob); err != nil {
		b.Fatal(err)
	}
	fi, err := os.Stat(layerTar)
	if err != nil {
		b.Fatal(err)
	}
	// The baseline gets a filesystem as big as kiln's automatic size.
	sizeMiB := fi.Size()*3/2>>20 + 128

	var kiln, cached, baseline time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		iter := filepath.Join(work, strconv.Itoa(i))
		b.StopTimer()
		mustRun(b, "sync")
		b.StartTimer()

		start := time.Now()
		mustRun(b, "sh", "-c", `mkdir -p "$1/stage" && gzip -dc "$2" | tar -x -C "$1/stage" && mkfs.ext4 -q -F -d "$1/stage" "$1/base.ext4" "$3M"`,
			"sh", iter, blob, strconv.FormatInt(sizeMiB, 10))
		baseline += time.Since(start)

		b.StopTimer()
		mustRun(b, "sync")
		b.StartTimer()
		cache := filepath.Join(iter, "cache")
		start = time.Now()
		mustRun(b, kilnBin, "convert", ref, "-o", filepath.Join(iter, "kiln.ext4"), "--cache-dir", cache)
		kiln += time.Since(start)

		b.StopTimer()
		mustRun(b, "sync")
		b.StartTimer()
		start = time.Now()
		mustRun(b, kilnBin, "convert", ref, "-o", filepath.Join(iter, "again.ext4"), "--cache-dir", cache)
		cached += time.Since(start)

		b.StopTimer()
		os.RemoveAll(iter)
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(baseline.Seconds()/n, "baseline-s")
	b.ReportMetric(kiln.Seconds()/n, "kiln-s")
	b.ReportMetric(cached.Seconds()/n, "cached-s")
	b.ReportMetric(kiln.Seconds()/baseline.Seconds(), "kiln/baseline")
	b.ReportMetric(cached.Seconds()/baseline.Seconds(), "cached/baseline")
}

func writeLayerBlob(img v1.Image, path string) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, rc); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func mustRun(b *testing.B, name string, args ...string) {
	b.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}
