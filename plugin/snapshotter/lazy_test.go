package snapshotter

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
)

// TestLazyDiskRecognised: the differ takes a lazily loaded disk's file for
// one of kiln's disks, and nothing else under the lazy directory.
func TestLazyDiskRecognised(t *testing.T) {
	sn, err := New(context.Background(), Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	dir := filepath.Join(sn.root, lazyDir, "7")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	disk, other, link := filepath.Join(dir, diskFile), filepath.Join(dir, "other.ext4"), filepath.Join(sn.root, lazyDir, "8", diskFile)
	for _, f := range []string{disk, other} {
		if err := os.WriteFile(f, nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(link), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/passwd", link); err != nil {
		t.Fatal(err)
	}
	ro := func(f string) []mount.Mount {
		return []mount.Mount{{Type: "ext4", Source: f, Options: []string{"ro", "loop"}}}
	}
	if d, ok := sn.ResolveDisks(ro(disk)); !ok || d.Disk != disk {
		t.Errorf("ResolveDisks(lazily loaded disk) = %+v, %v", d, ok)
	}
	for _, f := range []string{other, link, filepath.Join(sn.root, lazyDir, diskFile)} {
		if d, ok := sn.ResolveDisks(ro(f)); ok {
			t.Errorf("ResolveDisks(%s) = %+v, want it not recognised", f, d)
		}
	}
}

// TestReadLazy: a layer directory's record is read back and marked as an
// image's top once; a directory without one is not lazily loaded, and a
// damaged one is an error.
func TestReadLazy(t *testing.T) {
	dir := t.TempDir()
	if _, ok, err := readLazy(dir); ok || err != nil {
		t.Fatalf("readLazy(no record) = %v, %v", ok, err)
	}
	if err := writeSynced(dir, lazyFile, []byte(`{"ref":"r","index":0,"layers":2}`)); err != nil {
		t.Fatal(err)
	}
	rec, ok, err := readLazy(dir)
	if !ok || err != nil || rec.Ref != "r" || rec.Top != nil {
		t.Fatalf("readLazy = %+v, %v, %v", rec, ok, err)
	}
	// Pulled again as another image's top, it is that image's top too.
	l := &lazyImages{}
	if top, wrote, err := l.markTop(dir, lazyTop{Ref: "base"}); err != nil || !wrote || top.Ref != "base" {
		t.Fatalf("markTop = %+v, %v, %v", top, wrote, err)
	}
	if top, wrote, err := l.markTop(dir, lazyTop{Ref: "other"}); err != nil || wrote || top.Ref != "base" {
		t.Fatalf("markTop of a second top = %+v, %v, %v, want the first, unwritten", top, wrote, err)
	}
	if rec, _, err = readLazy(dir); err != nil || rec.Ref != "r" || rec.Top == nil || rec.Top.Ref != "base" {
		t.Fatalf("after markTop: %+v, %v", rec, err)
	}
	if err := os.WriteFile(filepath.Join(dir, lazyFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := readLazy(dir); err == nil {
		t.Errorf("readLazy(damaged record): no error")
	}
}

// TestStallReader: a blob that stops arriving fails the read once the
// stall timeout passes; one that keeps arriving does not.
func TestStallReader(t *testing.T) {
	pr, pw := io.Pipe()
	r := newStallReader(pr, 100*time.Millisecond, func() { pw.CloseWithError(context.Canceled) })
	defer r.Close()
	go func() {
		for range 3 {
			time.Sleep(60 * time.Millisecond) // each under the timeout
			pw.Write([]byte("kiln"))          //nolint:errcheck // read below
		}
	}()
	buf := make([]byte, 4)
	for i := range 3 {
		if _, err := io.ReadFull(r, buf); err != nil {
			t.Fatalf("read %d of a blob that keeps arriving: %v", i, err)
		}
	}
	if _, err := r.Read(buf); err == nil || !strings.Contains(err.Error(), "no data from the registry") {
		t.Errorf("read of a stalled blob: %v", err)
	}
}
