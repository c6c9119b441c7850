package initramfs

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/vmboot/kernel"
)

// entry is a cpio entry as readNewc reads it.
type entry struct {
	name         string
	mode         uint32
	rdev         [2]uint32
	data         string
	ino, namePad int
}

// readNewc parses a newc archive the way the kernel's initramfs unpacker
// does, checking the alignment of every name and body.
func readNewc(t *testing.T, archive []byte) []entry {
	t.Helper()
	var entries []entry
	off := 0
	for {
		if off%4 != 0 {
			t.Fatalf("header at offset %d is not 4-byte aligned", off)
		}
		if len(archive) < off+110 || string(archive[off:off+6]) != newcMagic {
			t.Fatalf("no newc header at offset %d", off)
		}
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(archive[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header field %d at %d: %v", i, off, err)
			}
			f[i] = uint32(v)
		}
		nameSize, size := int(f[11]), int(f[6])
		name := string(archive[off+110 : off+110+nameSize-1])
		if archive[off+110+nameSize-1] != 0 {
			t.Fatalf("%s: name is not NUL-terminated", name)
		}
		off = align4(off + 110 + nameSize)
		if name == trailer {
			if off != len(archive) {
				t.Errorf("%d bytes after the trailer", len(archive)-off)
			}
			return entries
		}
		entries = append(entries, entry{name: name, mode: f[1], rdev: [2]uint32{f[9], f[10]},
			data: string(archive[off : off+size]), ino: int(f[0])})
		off = align4(off + size)
	}
}

func align4(n int) int { return (n + 3) &^ 3 }

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	k := kernel.Kernel{Release: "6.1.0-test", Modules: filepath.Join(dir, "lib/modules/6.1.0-test")}
	mods := []kernel.Module{
		{Name: "virtio", Path: "kernel/drivers/virtio/virtio.ko"},
		{Name: "virtio_blk", Path: "kernel/drivers/block/virtio_blk.ko"},
		{Name: "overlay", Path: "kernel/fs/overlayfs/overlay.ko"},
	}
	for _, m := range mods {
		p := filepath.Join(k.Modules, m.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("module "+m.Name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	init := filepath.Join(dir, "kiln-init")
	if err := os.WriteFile(init, []byte("\x7fELF odd-sized"), 0o755); err != nil {
		t.Fatal(err)
	}

	var buf bytes.Buffer
	if err := Write(&buf, init, k, mods); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := Write(&again, init, k, mods); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("two writes of the same initramfs differ")
	}

	entries := readNewc(t, buf.Bytes())
	seen := map[string]entry{}
	inos := map[int]bool{}
	var listing []string
	for _, e := range entries {
		if dir := filepath.Dir(e.name); dir != "." {
			if p, ok := seen[dir]; !ok || p.mode&modeDir == 0 {
				t.Errorf("%s comes before its directory %s", e.name, dir)
			}
		}
		if inos[e.ino] {
			t.Errorf("%s reuses inode %d", e.name, e.ino)
		}
		inos[e.ino] = true
		seen[e.name] = e
		listing = append(listing, fmt.Sprintf("%s %o", e.name, e.mode))
	}
	for name, want := range map[string]string{
		"init":           "\x7fELF odd-sized",
		"kiln-initramfs": "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko\n/lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko\n/lib/modules/6.1.0-test/kernel/fs/overlayfs/overlay.ko\n",
		"lib/modules/6.1.0-test/kernel/fs/overlayfs/overlay.ko": "module overlay",
	} {
		if got := seen[name].data; got != want {
			t.Errorf("%s holds %q, want %q", name, got, want)
		}
	}
	if e := seen["init"]; e.mode != modeRegular|0o755 {
		t.Errorf("init has mode %o", e.mode)
	}
	if e := seen["dev/console"]; e.mode != modeCharDev|0o600 || e.rdev != [2]uint32{5, 1} {
		t.Errorf("dev/console: mode %o, device %v", e.mode, e.rdev)
	}
	for _, d := range []string{"dev", "proc", "sys", "root", "lib/modules/6.1.0-test/kernel/drivers/block"} {
		if seen[d].mode != modeDir|0o755 {
			t.Errorf("%s: mode %o, want a directory", d, seen[d].mode)
		}
	}

	// cpio(1), if installed, reads the same listing.
	if cpio, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command(cpio, "-it", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -t: %v", err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.name)
		}
		if got := strings.Fields(string(out)); strings.Join(got, " ") != strings.Join(names, " ") {
			t.Errorf("cpio -t lists %q, want %q", got, names)
		}
	}
	t.Logf("initramfs:\n%s", strings.Join(listing, "\n"))
}

func TestWriteMissingModule(t *testing.T) {
	init := filepath.Join(t.TempDir(), "kiln-init")
	if err := os.WriteFile(init, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	k := kernel.Kernel{Release: "r", Modules: t.TempDir()}
	err := Write(io.Discard, init, k, []kernel.Module{{Name: "gone", Path: "gone.ko"}})
	if err == nil || !strings.Contains(err.Error(), "gone.ko") {
		t.Errorf("Write with a missing module: %v", err)
	}
}
