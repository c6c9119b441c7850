package clone

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func sparseFile(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte("kiln"), 4096)
	for _, off := range []int64{0, 64 << 20} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(128 << 20); err != nil {
		t.Fatal(err)
	}
	return data
}

func blocks(t *testing.T, path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestAtomicKeepsContentAndHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := sparseFile(t, src)
	dst := filepath.Join(dir, "dst")
	if err := os.WriteFile(dst, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Atomic(src, dst, 0o644); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 128<<20 || fi.Mode().Perm() != 0o644 {
		t.Fatalf("size %d mode %v", fi.Size(), fi.Mode())
	}
	f, _ := os.Open(dst)
	defer f.Close()
	got := make([]byte, len(data))
	f.ReadAt(got, 64<<20)
	if !bytes.Equal(got, data) {
		t.Errorf("content at 64 MiB differs")
	}
	if b := blocks(t, dst); b > 1<<20 {
		t.Errorf("copy uses %d bytes: holes were filled", b)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Errorf("temporary files left: %v", ents)
	}
}

func TestFileRefusesExisting(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	sparseFile(t, src)
	dst := filepath.Join(dir, "dst")
	if err := File(src, dst, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := File(src, dst, 0o600); err == nil {
		t.Errorf("File over an existing file should fail")
	}
}

// TestReflink: a reflink shares the source's content, or, where the
// filesystem cannot share blocks, fails saying so and leaves nothing.
func TestReflink(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	want := bytes.Repeat([]byte("kiln"), 4096)
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	err := Reflink(src, dst, 0o600)
	if errors.Is(err, ErrNoReflink) {
		if _, serr := os.Lstat(dst); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("a failed reflink left %s (%v)", dst, serr)
		}
		t.Logf("no reflink here: %v", err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("the reflink holds %d bytes (%v), want the source's %d", len(got), err, len(want))
	}
	if err := Reflink(src, dst, 0o600); !errors.Is(err, os.ErrExist) {
		t.Errorf("a reflink over an existing file: %v, want it refused", err)
	}
}

// TestIntoRegionsOfAnySize copies a region that ends the file off a
// block boundary.
func TestIntoRegionsOfAnySize(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	want := make([]byte, 8<<20+5<<20/2+100)
	for i := range 5 << 20 / 2 {
		want[i] = byte(i*31 + i>>12)
		want[8<<20+i] = byte(i * 7)
	}
	for i := len(want) - 100; i < len(want); i++ {
		want[i] = 'k'
	}
	if err := os.WriteFile(src, want, 0o600); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "dst")
	if err := File(src, dst, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the copy differs from its source")
	}
}
