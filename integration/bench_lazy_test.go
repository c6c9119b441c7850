package integration

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/dirtar"
	"github.com/kilnfs/kiln/internal/vmboot/vmboottest"
)

// lazyShape is busybox with an /sbin/init that prints a marker and
// powers off, and a 1 GiB file it never reads.
var lazyShape = shape{name: "lazyboot1g-gzip", about: "busybox, an init script and a 1 GiB file it never reads", version: "v1", build: func(w *ociWriter) error {
	dir, err := testimage.Busybox()
	if err != nil {
		return err
	}
	if err := w.rawLayer(testimage.Gzip, func(out io.Writer) error { return dirtar.Write(out, dir, dirtar.Options{}) }); err != nil {
		return err
	}
	return w.tarLayer(testimage.Gzip, func(g *tarGen) error {
		init := "#!/bin/busybox sh\n/bin/busybox echo kiln-lazy-marker\n/bin/busybox poweroff -f\n"
		if err := g.dir("sbin"); err != nil {
			return err
		}
		if err := g.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "sbin/init", Mode: 0o755, Size: int64(len(init)), ModTime: shapeTime}); err != nil {
			return err
		}
		if _, err := io.WriteString(g.tw, init); err != nil {
			return err
		}
		return g.file("data/big.bin", 1<<30, 0)
	})
}}

// BenchmarkLazyBoot measures booting an image lazily, through kiln mount,
// from nothing local, against containerd's overlayfs pull of the same
// image (registry on 127.0.0.1), and reading the whole image through the
// mount against kiln convert --use-published of the same image whole.
// The image is lazyShape: what its boot reads is a small part of it.
//
//   - overlayfs: ctr image pull --snapshotter overlayfs, empty store.
//   - lazy boot: kiln mount into an empty chunk cache, then kiln boot of
//     the mounted file, until the guest prints its marker (the first
//     output of its workload); and the compressed bytes fetched.
//   - serve boot: ctr image pull --snapshotter kiln into kiln serve with
//     [share] lazy (no prefetch), then kiln boot of the lazily loaded
//     disk, until the guest prints its marker.
//   - local boot: the same boot from the image on local disk, the floor
//     lazy loading adds to (QEMU's boot itself).
//   - read whole: kiln mount into an empty cache, then reading the whole
//     file sequentially, against kiln convert --use-published -o of the
//     whole-image artifact into an empty cache (both download, check and
//     write every byte).
func BenchmarkLazyBoot(b *testing.B) {
	needRoot(b, "kiln mount mounts a FUSE filesystem; containerd runs as root")
	if os.Getenv("KILN_SKIP_BOOT") != "" {
		b.Skip("KILN_SKIP_BOOT is set")
	}
	vmboottest.RequireQEMU(b)
	kernel := vmboottest.Kernel(b).Vmlinuz
	f := prepareShape(b, lazyShape)
	work := b.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	// A registry as deployed (distribution, blobs on disk, range reads
	// served from the file), the image copied into it.
	dist := distributionRegistry(b)
	env := append(os.Environ(), "DOCKER_CONFIG="+shareDockerConfig(b, dist.host))
	ref := copyImage(b, f.ref, dist.host+"/lazy/"+f.name+":v1")
	kilnCmd := func(args ...string) *exec.Cmd {
		cmd := exec.CommandContext(ctx, kilnBin, args...)
		cmd.Env = env
		return cmd
	}
	mount := func(cache string) *lazyMount {
		dir := b.TempDir()
		return runMount(b, kilnCmd("mount", "--json", ref, dir, "--cache-dir", cache), dir)
	}
	run := func(args ...string) []byte {
		b.Helper()
		out, err := kilnCmd(args...).CombinedOutput()
		if err != nil {
			b.Fatalf("kiln %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	// Published both ways, and built locally, untimed.
	built := filepath.Join(work, "cache-built")
	local := filepath.Join(work, "local.ext4")
	run("convert", ref, "-o", local, "--cache-dir", built)
	run("push", ref, "--cache-dir", built)
	run("push", "--chunked", ref, "--cache-dir", built)
	fi, err := os.Stat(local)
	if err != nil {
		b.Fatal(err)
	}
	size := fi.Size()

	var overlay, lazy, served, floor, whole, published []time.Duration
	var fetched []int64
	for b.Loop() {
		e, err := testcontainerd.Start(testcontainerd.Options{Kiln: kilnBin})
		if errors.Is(err, testcontainerd.ErrUnavailable) {
			b.Skipf("containerd cannot run here: %v", err)
		}
		if err != nil {
			b.Fatal(err)
		}
		syncDisks(b)
		start := time.Now()
		if out, err := e.Ctr(ctx, "image", "pull", "--snapshotter", "overlayfs", "--user", shareUser+":"+sharePassword, ref); err != nil {
			b.Fatalf("ctr pull: %v\n%s", err, out)
		}
		overlay = append(overlay, time.Since(start))
		e.Close()

		syncDisks(b)
		start = time.Now()
		m := mount(filepath.Join(work, "cache-lazy"))
		bootUntil(b, kernel, m.file, "kiln-lazy-marker")
		lazy = append(lazy, time.Since(start))
		fetched = append(fetched, m.stop(b).Fetched.Bytes)

		e, err = testcontainerd.Start(testcontainerd.Options{Kiln: kilnBin,
			Config: "[share]\nlazy = true\nlazy_prefetch = false\n", KilnEnv: []string{"DOCKER_CONFIG=" + shareDockerConfig(b, dist.host)}})
		if err != nil {
			b.Fatal(err)
		}
		syncDisks(b)
		start = time.Now()
		if out, err := e.Ctr(ctx, "image", "pull", "--snapshotter", "kiln", "--user", shareUser+":"+sharePassword, ref); err != nil {
			b.Fatalf("ctr pull: %v\n%s", err, out)
		}
		disks, _ := filepath.Glob(filepath.Join(e.KilnRoot, "lazy", "*", "disk.ext4"))
		if len(disks) != 1 {
			b.Fatalf("lazily loaded disks after the pull: %v, want one\n%s", disks, e.KilnLogs())
		}
		bootUntil(b, kernel, disks[0], "kiln-lazy-marker")
		served = append(served, time.Since(start))
		e.Close()

		start = time.Now()
		bootUntil(b, kernel, local, "kiln-lazy-marker")
		floor = append(floor, time.Since(start))

		syncDisks(b)
		start = time.Now()
		m = mount(filepath.Join(work, "cache-whole"))
		readAll(b, m.file)
		whole = append(whole, time.Since(start))
		m.stop(b)

		syncDisks(b)
		start = time.Now()
		out := filepath.Join(work, "published.ext4")
		run("convert", "--use-published", ref, "-o", out, "--cache-dir", filepath.Join(work, "cache-published"))
		published = append(published, time.Since(start))
		for _, d := range []string{"cache-lazy", "cache-whole", "cache-published"} {
			os.RemoveAll(filepath.Join(work, d))
		}
		os.Remove(out)
	}
	o := percentile(overlay, 50).Seconds()
	b.ReportMetric(o, "overlayfs-s")
	b.ReportMetric(percentile(lazy, 50).Seconds()/o, "lazy-boot/overlayfs")
	b.ReportMetric(percentile(served, 50).Seconds()/o, "serve-lazy-boot/overlayfs")
	b.ReportMetric(percentile(floor, 50).Seconds()/o, "local-boot/overlayfs")
	b.ReportMetric(float64(median(fetched))/float64(size), "fetched/image")
	b.ReportMetric(percentile(whole, 50).Seconds()/percentile(published, 50).Seconds(), "read-whole/published-convert")
	b.Logf("overlayfs pull %.2fs; lazy boot to first output %.2fs (kiln serve: pull and boot %.2fs), local boot %.2fs; fetched %d of %d bytes; read whole %.2fs, published convert %.2fs",
		o, percentile(lazy, 50).Seconds(), percentile(served, 50).Seconds(), percentile(floor, 50).Seconds(), median(fetched), size,
		percentile(whole, 50).Seconds(), percentile(published, 50).Seconds())
}

// bootUntil boots image with kiln boot and returns once the console
// shows marker; the VM is then stopped.
func bootUntil(b *testing.B, kernel, image, marker string) {
	b.Helper()
	found := false
	console := bootWatch(b, kernel, image, func(line string) bool {
		found = strings.Contains(line, marker)
		return found
	})
	if !found {
		b.Fatalf("the guest did not print %s:\n%s", marker, lastLines(console, 30))
	}
}

// readAll reads the file to its end and closes it: kiln mount waits for
// its file to be closed before it ends.
func readAll(b *testing.B, path string) {
	b.Helper()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(io.Discard, f); err != nil {
		b.Fatalf("reading %s: %v", path, err)
	}
}

// copyImage copies the image src (in the test registry) to dst, with the
// test's credentials, and returns dst.
func copyImage(b *testing.B, src, dst string) string {
	b.Helper()
	from, err := name.ParseReference(src)
	if err != nil {
		b.Fatal(err)
	}
	to, err := name.ParseReference(dst)
	if err != nil {
		b.Fatal(err)
	}
	img, err := remote.Image(from)
	if err != nil {
		b.Fatal(err)
	}
	if err := remote.Write(to, img, remote.WithAuth(&authn.Basic{Username: shareUser, Password: sharePassword})); err != nil {
		b.Fatalf("copying %s to %s: %v", src, dst, err)
	}
	return dst
}
