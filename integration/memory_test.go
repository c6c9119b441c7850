package integration

import (
	"archive/tar"
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
)

// bigFileLayer writes a layer tar holding one file of size bytes whose
// blocks all differ (nothing for ext4 to leave as holes). It returns the
// tar's path and the file's SHA-256.
func bigFileLayer(t testing.TB, dir string, size int64) (string, string) {
	t.Helper()
	path := filepath.Join(dir, "big.tar")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: epoch2020}); err != nil {
		t.Fatal(err)
	}
	block := make([]byte, 4096)
	for i := range block {
		block[i] = byte(i)
	}
	h := sha256.New()
	for off := int64(0); off < size; off += int64(len(block)) {
		binary.LittleEndian.PutUint64(block, uint64(off))
		if _, err := tw.Write(block); err != nil {
			t.Fatal(err)
		}
		h.Write(block)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path, hex.EncodeToString(h.Sum(nil))
}

// maxRSS converts an image and returns kiln's peak resident memory, read
// from /proc while it runs (VmHWM). The rusage of the exited child would
// not do: it starts from this process's own peak, which the child shared
// until it exec'd kiln.
func maxRSS(t *testing.T, src, out string) int64 {
	t.Helper()
	cmd := exec.Command(kilnBin, "convert", src, "-o", out, "--cache-dir", t.TempDir())
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	var outb strings.Builder
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	status := fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)
	var peak int64
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("kiln convert %s: %v\n%s", src, err, outb.String())
			}
			return peak
		case <-time.After(5 * time.Millisecond):
		}
		b, err := os.ReadFile(status)
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
				if kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64); err == nil {
					peak = max(peak, kb<<10)
				}
			}
		}
	}
}

// TestConvertMemoryDoesNotGrow converts a 64 MiB and a 512 MiB file: layer
// data is streamed, so kiln's peak memory stays about the same.
func TestConvertMemoryDoesNotGrow(t *testing.T) {
	dir := t.TempDir()
	var rss []int64
	for _, size := range []int64{64 << 20, 512 << 20} {
		layout := filepath.Join(dir, "layout")
		os.RemoveAll(layout)
		tarPath, sum := bigFileLayer(t, dir, size)
		writeBigLayout(t, layout, tarPath)
		out := filepath.Join(dir, "big.ext4")
		rss = append(rss, maxRSS(t, "oci:"+layout+":big", out))
		fsck(t, out)
		// The file spans several extents (a tree of depth one at 512
		// MiB): every block must hold its own content.
		dump := filepath.Join(dir, "big.dump")
		if out, err := exec.Command("debugfs", "-R", "dump /big "+dump, out).CombinedOutput(); err != nil {
			t.Fatalf("debugfs dump: %v\n%s", err, out)
		}
		if got := fileSHA(t, dump); got != sum {
			t.Errorf("%d MiB file: content sha256 %s, want %s", size>>20, got, sum)
		}
		os.Remove(dump)
		os.Remove(out)
	}
	t.Logf("peak memory: %d MiB for 64 MiB of data, %d MiB for 512 MiB", rss[0]>>20, rss[1]>>20)
	if rss[1] > rss[0]+48<<20 {
		t.Errorf("peak memory grew from %d MiB to %d MiB with the layer", rss[0]>>20, rss[1]>>20)
	}
}

func writeBigLayout(t *testing.T, layout, layer string) {
	t.Helper()
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{File: layer}}, Config: v1.Config{Cmd: []string{"/big"}}})
	if err := testimage.WriteLayout(layout, "big", img); err != nil {
		t.Fatal(err)
	}
}
