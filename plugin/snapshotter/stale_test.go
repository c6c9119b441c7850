package snapshotter

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/ext4write"
)

// TestWriterChangeDropsDisks: disks built by another ext4 writer are
// dropped at startup, as for any other option that changes their bytes;
// the same options keep them.
func TestWriterChangeDropsDisks(t *testing.T) {
	needE2fsprogs(t)
	root := t.TempDir()
	sn, ctx := newCommittedBase(t, Config{Root: root, Build: build.Options{Writer: ext4write.Writer{}}})
	if _, err := sn.View(ctx, "v", "base"); err != nil {
		t.Fatal(err)
	}
	sn.Close()
	disk := filepath.Join(root, snapshotsDir, "1", diskFile)
	if !exists(disk) {
		t.Fatalf("no disk")
	}
	for _, w := range []build.Writer{ext4write.Writer{}, ext4.E2fsprogs{}} {
		sn, err := New(ctx, Config{Root: root, Build: build.Options{Writer: w}})
		if err != nil {
			t.Fatal(err)
		}
		sn.Close()
		if kept := exists(disk); kept != (w.Name() == "kiln") {
			t.Errorf("writer %s: the disk kept: %v", w.Name(), kept)
		}
	}
	if _, err := os.Stat(filepath.Join(root, disksKeyFile+".new")); !os.IsNotExist(err) {
		t.Errorf("the key's temporary file was left behind")
	}
}
