package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/testenv"
)

// TestUnsyncedDisksAtStartup: a disk left unsynced in an earlier boot
// may be torn and is removed; one from this boot (kiln alone restarted)
// is synced and kept.
func TestUnsyncedDisksAtStartup(t *testing.T) {
	if len(bootID()) == 0 {
		testenv.Unavailable(t, "no boot ID at %s", bootIDFile)
	}
	root := t.TempDir()
	write := func(id, bootID string) string {
		dir := filepath.Join(root, "snapshots", id)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, diskFile), []byte("image"), 0o444); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, unsyncedFile), []byte(bootID+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	before := write("1", "00000000-0000-0000-0000-000000000000")
	now := write("2", string(bootID()))
	b := newDiskBuilder(root, nil, nil, build.Options{}, nil, newBuildQueue(1, nil), nil)
	defer b.close()
	b.settleUnsynced(context.Background())
	if exists(filepath.Join(before, diskFile)) || exists(filepath.Join(before, unsyncedFile)) {
		t.Errorf("the disk from an earlier boot was kept")
	}
	if !exists(filepath.Join(now, diskFile)) || exists(filepath.Join(now, unsyncedFile)) {
		t.Errorf("the disk from this boot should be kept and marked synced")
	}
}

// TestLayerUnsyncedBeforeReboot: a layer stored without a sync is marked
// until its data is synced; one an earlier boot left marked may be torn,
// and its disk is not built from it: the error says the layer was lost.
func TestLayerUnsyncedBeforeReboot(t *testing.T) {
	needE2fsprogs(t)
	if len(bootID()) == 0 {
		testenv.Unavailable(t, "no boot ID at %s", bootIDFile)
	}
	sn, ctx := newCommittedBase(t, Config{})
	dir, _, err := writeLayer(ctx, sn, "extract-2 x", "", map[string]string{"etc/x": "x"})
	if err != nil {
		t.Fatal(err)
	}
	mark := filepath.Join(dir, dataUnsyncedFile)
	if !exists(mark) {
		t.Fatalf("a layer stored without a sync has no %s", dataUnsyncedFile)
	}
	if err := sn.Commit(ctx, "x", "extract-2 x"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mark, []byte("00000000-0000-0000-0000-000000000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "v", "x"); !errdefs.IsDataLoss(err) {
		t.Errorf("a view of a layer torn by a crash: %v, want a data loss error", err)
	}
	// Synced in this boot: the mark goes.
	if err := os.WriteFile(mark, append(bootID(), '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syncLayer(dir); err != nil || exists(mark) {
		t.Errorf("syncing the layer: %v; mark still there: %v", err, exists(mark))
	}
	if _, err := sn.View(ctx, "v", "x"); err != nil {
		t.Errorf("a view of the synced layer: %v", err)
	}
}
