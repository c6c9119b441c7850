package ext4

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/testenv"
)

func needE2fsprogs(t *testing.T) {
	t.Helper()
	for _, name := range []string{"mke2fs", "debugfs", "e2fsck"} {
		if toolPath(name) == name {
			if _, err := exec.LookPath(name); err != nil {
				testenv.Unavailable(t, "%s not installed (e2fsprogs)", name)
			}
		}
	}
}

// TestFormatAndAdd: an empty filesystem costs little disk whatever its
// size, and entries added to it are exact and reproducible.
func TestFormatAndAdd(t *testing.T) {
	needE2fsprogs(t)
	ctx := context.Background()
	dir := t.TempDir()
	when := time.Date(2001, 2, 3, 4, 5, 6, 7, time.UTC)
	entries := []Entry{
		{Path: "/upper", Dir: true, Mode: 0o755, Time: when},
		{Path: "/upper/.kiln", Dir: true, Mode: 0o711, UID: 7, Time: when},
		{Path: "/upper/.kiln/config.json", Data: []byte(`{"a":1}`), Mode: 0o640, UID: 1, GID: 2, Time: when},
	}
	var images []string
	for _, name := range []string{"a.ext4", "b.ext4"} {
		p := filepath.Join(dir, name)
		if err := Format(ctx, p, 64<<20, "kiln-scratch", "test", dir); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := Add(ctx, f, dir, entries); err != nil {
			t.Fatal(err)
		}
		// Replacing a file keeps the result exact.
		entries[2].Data = []byte(`{"b":2}`)
		if err := Add(ctx, f, dir, entries[2:]); err != nil {
			t.Fatal(err)
		}
		f.Close()
		entries[2].Data = []byte(`{"a":1}`)
		if err := Check(ctx, p); err != nil {
			t.Fatal(err)
		}
		images = append(images, p)
	}
	a, _ := os.ReadFile(images[0])
	b, _ := os.ReadFile(images[1])
	if !bytes.Equal(a, b) {
		t.Errorf("the same steps gave different bytes")
	}
	big := filepath.Join(dir, "big.ext4")
	if err := Format(ctx, big, 1<<30, "kiln-scratch", "test", dir); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(big, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("an empty 1 GiB filesystem takes %d KiB of disk, want at most 1 MiB", used>>10)
	}
	f, err := os.Open(images[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	found, size, err := Has(f, "/upper/.kiln/config.json")
	if err != nil || !found || size != int64(len(`{"b":2}`)) {
		t.Errorf("Has: %v %d %v", found, size, err)
	}
	out, err := exec.Command(toolPath("debugfs"), "-R", "stat /upper/.kiln/config.json", images[0]).CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Mode:  0640", "User:     1", "Group:     2", "Size: 7"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("stat lacks %q:\n%s", want, out)
		}
	}
}
