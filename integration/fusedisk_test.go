package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/fusedisk"
	"github.com/kilnfs/kiln/internal/fusedisk/fusedisktest"
)

// TestBootFUSEDisk boots a rootfs that QEMU reads through a fusedisk
// mount, as a lazily fetched root disk is served: the workload runs, and
// the Source is asked for what the boot reads only, far less than the
// 64 MiB file in the image that nothing reads.
func TestBootFUSEDisk(t *testing.T) {
	kernel := needBoot(t)
	const unread = 64 << 20
	big, _ := bigFileLayer(t, t.TempDir(), unread)
	img := busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/busybox", "sh", "-c"},
		Cmd:        []string{"echo kiln-fuse-marker $(busybox stat -c %s /big)"},
		Env:        []string{"PATH=/bin"},
	}, testimage.Layer{File: big, Compression: testimage.Zstd})
	ref := mustPush(t, "boot/fusedisk:v1", img)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	convert(t, ref, out, t.TempDir(), "--inject", "init")
	before := fileSHA(t, out)
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}

	src := fusedisktest.OpenFile(t, out)
	d := fusedisktest.Mount(t, src, fusedisk.Options{})
	status, _, console := boot(t, kernel, d.Path())
	if status != 0 || !strings.Contains(console, "kiln-fuse-marker 67108864") {
		t.Errorf("status %d, want 0 and the marker:\n%s", status, tailLines(console, 30))
	}
	reads, n, largest := src.Counts()
	t.Logf("the boot read %d bytes of the %d-byte image in %d reads, the largest %d bytes", n, fi.Size(), reads, largest)
	if reads == 0 || n > unread/4 {
		t.Errorf("the source served %d reads of %d bytes in all; want some, and far less than the %d bytes nothing reads", reads, n, unread)
	}
	if err := d.Unmount(); err != nil {
		t.Fatal(err)
	}
	if fileSHA(t, out) != before {
		t.Error("booting through the mount changed the image")
	}
}
