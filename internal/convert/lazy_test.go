package convert

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/store"
)

// TestChunkBudget: kiln mount's chunks get what the cache's budget leaves
// once images and blobs are counted, and at least a tenth of it; the
// mount evicts nothing else.
func TestChunkBudget(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	publish := func(key string, size int) {
		wd, err := st.NewWorkDir()
		if err != nil {
			t.Fatal(err)
		}
		defer wd.Release()
		f := filepath.Join(wd.Path, "rootfs.ext4")
		if err := os.WriteFile(f, bytes.Repeat([]byte{1}, size), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := st.PublishRootfs(ctx, f, store.Image{Key: key, Image: "img-" + key}); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := chunkBudget(ctx, dir, 0); err != nil || got != 0 {
		t.Errorf("no budget: chunks get %d (%v), want no budget (0)", got, err)
	}
	publish(strings.Repeat("a", 64), 1<<20)
	got, err := chunkBudget(ctx, dir, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	if got < 2<<20 || got > 3<<20 {
		t.Errorf("a 4 MiB budget with a 1 MiB image: chunks get %d, want about 3 MiB", got)
	}
	publish(strings.Repeat("b", 64), 8<<20)
	if got, err = chunkBudget(ctx, dir, 4<<20); err != nil || got != (4<<20)/10 {
		t.Errorf("images over the budget: chunks get %d (%v), want a tenth of it", got, err)
	}
	if list, err := st.List(ctx); err != nil || len(list.Images) != 2 {
		t.Errorf("the mount's budget evicted images: %v", err)
	}
}
