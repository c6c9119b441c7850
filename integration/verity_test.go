package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/verity/veritytest"
)

// convertVerity runs kiln convert --verity --json and returns the verity
// object it reported.
func convertVerity(t *testing.T, src, out, cache string, more ...string) verity.Info {
	t.Helper()
	res := kiln(t, run{args: convertArgs(src, out, cache, append([]string{"--verity"}, more...)...)})
	if res.err != nil {
		t.Fatalf("kiln convert --verity %s: %v\n%s", src, res.err, res.stderr)
	}
	var s struct{ Verity *verity.Info }
	if err := json.Unmarshal([]byte(res.stdout), &s); err != nil || s.Verity == nil {
		t.Fatalf("--json has no verity object (%v):\n%s", err, res.stdout)
	}
	return *s.Verity
}

// TestConvertVerity: kiln convert --verity appends a tree that
// veritysetup accepts with what --json reports, after a filesystem of
// the size it would have without; the bytes are reproducible, cached or
// not, and a changed data byte is caught.
func TestConvertVerity(t *testing.T) {
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t,
		tDir("etc", 0o755, t1), tFile("etc/hello", 0o644, t1, "hello, verity\n"))}}})
	ref := mustPush(t, "verity/small:v1", img)
	dir := t.TempDir()

	plain := filepath.Join(dir, "plain.ext4")
	ps := convert(t, ref, plain, filepath.Join(dir, "cache"))
	out := filepath.Join(dir, "verity.ext4")
	v := convertVerity(t, ref, out, filepath.Join(dir, "cache"))
	if err := veritytest.Verify(t, out, v); err != nil {
		t.Fatalf("veritysetup verify with the reported root hash: %v", err)
	}
	im := inspect(t, out)
	if fs := im.BlockSize * im.BlockCount; fs != v.DataSize || fs != ps.Size || v.DataBlocks*4096 != fs {
		t.Errorf("filesystem %d bytes, --json data_size %d (%d blocks), without --verity %d", fs, v.DataSize, v.DataBlocks, ps.Size)
	}
	if v.HashOffset != v.DataSize || v.HashStartBlock != v.DataBlocks+1 || v.Algorithm != "sha256" ||
		v.DataBlockSize != 4096 || v.HashBlockSize != 4096 || len(v.Salt) != 64 || len(v.RootHash) != 64 {
		t.Errorf("verity object %+v", v)
	}
	if fi, err := os.Stat(out); err != nil || fi.Size() <= v.HashOffset {
		t.Errorf("no tree after the filesystem: %v", err)
	}
	// e2fsck goes by the filesystem's own size: the tree after it and
	// the data part alone are both clean.
	fsck(t, out)
	data := filepath.Join(dir, "data.ext4")
	if err := clone.File(out, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(data, v.DataSize); err != nil {
		t.Fatal(err)
	}
	fsck(t, data)

	t.Run("reproducible", func(t *testing.T) {
		again := filepath.Join(t.TempDir(), "again.ext4")
		if v2 := convertVerity(t, ref, again, filepath.Join(t.TempDir(), "cache")); v2 != v || fileSHA(t, again) != fileSHA(t, out) {
			t.Errorf("a fresh build differs: %+v vs %+v", v2, v)
		}
		cached := filepath.Join(t.TempDir(), "cached.ext4")
		if v3 := convertVerity(t, ref, cached, filepath.Join(dir, "cache")); v3 != v || fileSHA(t, cached) != fileSHA(t, out) {
			t.Errorf("the cached copy differs: %+v vs %+v", v3, v)
		}
	})

	t.Run("flipped data byte", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "bad.ext4")
		if err := clone.File(out, bad, 0o600); err != nil {
			t.Fatal(err)
		}
		flipByte(t, bad, v.DataSize/2)
		if err := veritytest.Verify(t, bad, v); err == nil {
			t.Error("veritysetup verify accepted a disk with a flipped data byte")
		}
	})

	// With the init piece, kiln writes the image's config into each copy:
	// the copy's tree covers it.
	t.Run("inject init", func(t *testing.T) {
		cache := filepath.Join(t.TempDir(), "cache")
		for i := range 2 {
			p := filepath.Join(t.TempDir(), "init.ext4")
			vi := convertVerity(t, ref, p, cache, "--inject", "init")
			if err := veritytest.Verify(t, p, vi); err != nil {
				t.Errorf("conversion %d: veritysetup verify: %v", i+1, err)
			}
			fsck(t, p)
		}
	})
}

// TestBootVerity boots a verity disk as the guest's root through
// dm-mod.create=, as docs/containerd.md tells VMMs to, with the test
// kernel, which has device-mapper and dm-verity as modules and no
// CONFIG_DM_INIT: kiln boot then boots through kiln-init's initramfs,
// which loads them and creates the device. A flipped byte in a file the
// guest reads ends the boot with an I/O error instead.
func TestBootVerity(t *testing.T) {
	kernel := needBoot(t)
	const marker = "kiln-verity-marker"
	img := busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/busybox", "sh", "-c"},
		Cmd:        []string{`echo ` + marker + ` $(/bin/busybox grep ' / ' /proc/mounts); exit 0`},
		Env:        []string{"PATH=/bin"},
	})
	ref := mustPush(t, "boot/verity:v1", img)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	v := convertVerity(t, ref, out, t.TempDir(), "--inject", "init")
	// kiln boot attaches the disk as the first NVMe drive.
	params := []string{"--append", "dm-mod.create=vroot,,,ro," + v.Table("/dev/nvme0n1"), "--append", "root=/dev/dm-0"}

	status, _, console := bootWith(t, kernel, out, params)
	if want := marker + " /dev/dm-0 / ext4 ro"; status != 0 || !strings.Contains(console, want) {
		t.Errorf("status %d, want 0 and %q on the console:\n%s", status, want, tailLines(console, 30))
	}

	// kiln boot checks the parameters before it boots anything.
	t.Run("malformed dm-mod.create", func(t *testing.T) {
		status, _, console := bootWith(t, kernel, out, []string{"--append", "dm-mod.create=vroot,,,ro,0 8 zero /dev/nvme0n1"})
		want := `kiln: kernel parameters: dm-mod.create: device 1: "vroot": table 1: target type "zero"`
		if status == 0 || !strings.Contains(console, want) || strings.Contains(console, "Linux version") {
			t.Errorf("status %d, want an error saying %q before any boot:\n%s", status, want, tailLines(console, 30))
		}
	})

	t.Run("flipped data byte", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "bad.ext4")
		if err := clone.File(out, bad, 0o600); err != nil {
			t.Fatal(err)
		}
		// The workload's command line, in the image config kiln-init reads.
		data, err := os.ReadFile(bad)
		if err != nil {
			t.Fatal(err)
		}
		at := bytes.Index(data[:v.DataSize], []byte(marker))
		if at < 0 || bytes.Count(data[:v.DataSize], []byte(marker)) != 1 {
			t.Fatalf("the disk holds the marker %d times, want once", bytes.Count(data[:v.DataSize], []byte(marker)))
		}
		flipByte(t, bad, int64(at))
		status, _, console := bootWith(t, kernel, bad, params)
		if status == 0 || strings.Contains(console, marker+" ") ||
			!regexp.MustCompile(`kiln-init: error: .*input/output error`).MatchString(console) {
			t.Errorf("status %d, want a failure with kiln-init's I/O error and no marker:\n%s", status, tailLines(console, 30))
		}
		if !strings.Contains(console, "is corrupted") {
			t.Errorf("the kernel did not report the corrupted block:\n%s", tailLines(console, 30))
		}
	})
}

// flipByte flips the lowest bit of the byte at offset at of a file.
func flipByte(t *testing.T, path string, at int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 1
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}
