package snapshotter

import (
	"os/exec"
	"strconv"
	"testing"

	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/verity/veritytest"
)

// TestVerityLabels: with [build] verity, the image's disk carries a
// dm-verity tree that veritysetup accepts with the root hash and offset
// the snapshot's labels give, and a view of it reports the same.
func TestVerityLabels(t *testing.T) {
	needE2fsprogs(t)
	cfg := Config{DefaultSize: 64 << 20}
	cfg.Build.Verity = true
	sn, ctx := newCommittedBase(t, cfg)
	info, err := sn.Stat(ctx, "base")
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := info.Labels[LabelVerityPrefix+"root-hash"]; ok {
		t.Errorf("labels before the disk is built: root hash %q", v)
	}
	view, err := sn.View(ctx, "view", "base")
	if err != nil {
		t.Fatal(err)
	}
	disk := view[0].Source
	for _, key := range []string{"base", "view"} {
		info, err := sn.Stat(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		l := func(name string) string { return info.Labels[LabelVerityPrefix+name] }
		if l("algorithm") != "sha256" || l("data-block-size") != "4096" || l("hash-block-size") != "4096" || len(l("salt")) != 64 {
			t.Errorf("%s: verity labels %v", key, info.Labels)
		}
		blocks, _ := strconv.ParseInt(l("data-blocks"), 10, 64)
		off, _ := strconv.ParseInt(l("hash-offset"), 10, 64)
		if start, _ := strconv.ParseInt(l("hash-start-block"), 10, 64); blocks == 0 || off != blocks*4096 || start != blocks+1 {
			t.Errorf("%s: %d data blocks, hash offset %d, hash start block %d", key, blocks, off, start)
		}
		if err := veritytest.Verify(t, disk, verity.Info{RootHash: l("root-hash"), HashOffset: off}); err != nil {
			t.Errorf("%s: with the labels' root hash and offset: %v", key, err)
		}
	}
	if out, err := exec.Command("e2fsck", "-fn", disk).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn on the disk with its tree: %v\n%s", err, out)
	}
}
