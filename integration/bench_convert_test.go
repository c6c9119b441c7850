package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// BenchmarkConvertMinbase converts the debootstrap minbase image from a
// registry on 127.0.0.1 and, in the same run, the plain pipeline kiln
// replaces: `gzip -dc layer | tar -x` into a directory, then `mkfs.ext4
// -d`. It reports the ratios (targets: cold ≤ 1.2, cached ≤ 0.1). The
// machines are shared and noisy, so only the ratios of one run mean
// anything; set TMPDIR to a dedicated filesystem for steadier numbers.
func BenchmarkConvertMinbase(b *testing.B) {
	ref := minbaseRef(b)
	work := b.TempDir()
	blob := filepath.Join(work, "layer.tar.gz")
	if err := writeLayerBlob(minbase.img, blob); err != nil {
		b.Fatal(err)
	}
	fi, err := os.Stat(minbase.tar)
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
		out, err := exec.Command(kilnBin, "convert", "--json", ref, "-o", filepath.Join(iter, "kiln.ext4"), "--cache-dir", cache).CombinedOutput()
		kiln += time.Since(start)
		if err != nil {
			b.Fatalf("kiln convert: %v\n%s", err, out)
		}
		b.Logf("kiln convert: %s", timings(out))

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

// timings picks the timings out of kiln convert --json, for the log.
func timings(out []byte) string {
	var s struct {
		Timings map[string]int64 `json:"timings_ms"`
	}
	if json.Unmarshal(out, &s) != nil {
		return string(out)
	}
	return fmt.Sprint(s.Timings)
}
