package snapshotter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
)

// fakeImages stands for containerd's image store: which chains are the
// tops of images.
type fakeImages struct{ tops map[digest.Digest]bool }

func (f *fakeImages) Config(context.Context, string, string, digest.Digest) ([]byte, error) {
	return nil, os.ErrNotExist
}

func (f *fakeImages) Tops(context.Context) (map[digest.Digest]bool, error) { return f.tops, nil }

func (f *fakeImages) Named(context.Context, string, digest.Digest) ([]NamedImage, error) {
	return nil, nil
}

// TestSweepRemovesUnneededDisks: a disk stays while its snapshot is an
// image's top or has a container on it, and goes once neither holds; its
// layer stays, and the disk comes back when needed.
func TestSweepRemovesUnneededDisks(t *testing.T) {
	needE2fsprogs(t)
	chain := digest.FromString("base")
	images := &fakeImages{tops: map[digest.Digest]bool{chain: true}}
	sn, ctx := newCommittedBase(t, Config{Images: images, UnusedDiskGrace: time.Minute})
	// The committed name, as containerd's metadata store makes it.
	storeLayer(t, sn, "extract-2 x", "", map[string]string{"etc/x": "x"})
	name := "test/7/" + chain.String()
	if err := sn.Commit(ctx, name, "extract-2 x"); err != nil {
		t.Fatal(err)
	}
	view, err := sn.View(ctx, "v", name)
	if err != nil {
		t.Fatal(err)
	}
	disk := view[0].Source
	if exists(filepath.Join(filepath.Dir(disk), layerData)) {
		t.Errorf("the disk of a layer kept by kiln was not built in the layer's data file")
	}
	first, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	age := func() {
		if err := os.Chtimes(disk, old, old); err != nil {
			t.Fatal(err)
		}
	}
	age()
	sweep := func() int {
		t.Helper()
		n, err := sn.sweeper.sweep(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := sweep(); n != 0 || !exists(disk) {
		t.Fatalf("swept %d: an image's top lost its disk", n)
	}
	images.tops = nil
	if n := sweep(); n != 0 || !exists(disk) {
		t.Fatalf("swept %d: a disk with a view on it went", n)
	}
	if err := sn.Remove(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if n := sweep(); n != 1 || exists(disk) {
		t.Fatalf("swept %d: the unneeded disk stayed", n)
	}
	if !exists(filepath.Join(filepath.Dir(disk), layerData)) || !exists(filepath.Join(filepath.Dir(disk), layerRecord)) {
		t.Errorf("the layer went with the disk")
	}
	// Needed again: built again, the same bytes.
	if _, err := sn.View(ctx, "v2", name); err != nil || !exists(disk) {
		t.Errorf("the disk was not built again: %v", err)
	}
	if again, err := os.ReadFile(disk); err != nil || !bytes.Equal(again, first) {
		t.Errorf("the disk built again differs from the first: %v", err)
	}
	// A fresh disk is left alone for a while.
	if err := sn.Remove(ctx, "v2"); err != nil {
		t.Fatal(err)
	}
	if n := sweep(); n != 0 {
		t.Errorf("swept a disk built a moment ago")
	}
}

// TestStartupRecovers: what an interrupted run leaves is put right when
// kiln starts: a directory no snapshot owns is removed (and its ID can be
// given out again), a removal cut short before it was recorded is undone,
// and disks built with other options go.
func TestStartupRecovers(t *testing.T) {
	needE2fsprogs(t)
	root := t.TempDir()
	sn, ctx := newCommittedBase(t, Config{Root: root})
	if _, err := sn.View(ctx, "v", "base"); err != nil {
		t.Fatal(err)
	}
	sn.Close()
	base := filepath.Join(root, snapshotsDir)
	// Snapshot 2 is the view: a removal renamed it and died. Snapshot 3
	// was made by a transaction that did not commit.
	if err := os.Rename(filepath.Join(base, "2"), filepath.Join(base, removingPrefix+"2")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(base, "3"), 0o700); err != nil {
		t.Fatal(err)
	}
	sn, err := New(ctx, Config{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if !exists(filepath.Join(base, "2")) || exists(filepath.Join(base, removingPrefix+"2")) {
		t.Errorf("the view's directory was not put back")
	}
	if exists(filepath.Join(base, "3")) {
		t.Errorf("an orphan directory stayed")
	}
	if _, err := sn.Prepare(ctx, "c", "base"); err != nil {
		t.Errorf("a new snapshot after the orphan: %v", err)
	}
	disk := filepath.Join(base, "1", diskFile)
	if !exists(disk) {
		t.Fatalf("no disk")
	}
	sn.Close()
	// Other build options: the disk goes.
	sn, err = New(ctx, Config{Root: root, Build: build.Options{Size: 512 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	if exists(disk) {
		t.Errorf("a disk built with other options stayed")
	}
}
