package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"testing"

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
