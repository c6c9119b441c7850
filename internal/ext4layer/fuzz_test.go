package ext4layer_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/kilnfs/kiln/internal/ext4layer"
	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

// FuzzLayers writes every kind of layer from a hostile image; it must
// not panic or hang, whatever the image says.
func FuzzLayers(f *testing.F) {
	ext4test.Require(f)
	stage := f.TempDir()
	for name, data := range map[string]string{"a/f": "one", "a/g": "two", "b/h": "three", "upper/x": "x"} {
		p := filepath.Join(stage, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			f.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			f.Fatal(err)
		}
	}
	if err := os.Link(filepath.Join(stage, "a/f"), filepath.Join(stage, "b/link")); err != nil {
		f.Fatal(err)
	}
	img := ext4test.Mkfs(f, stage, "256K", "-b", "1024", "-O", "^has_journal", "-N", "32")
	ext4test.Debugfs(f, img, "cd /upper", "mknod wh c 0 0", "symlink s /target")
	ext4test.SetXattrs(f, img, "/upper", map[string][]byte{"trusted.overlay.opaque": []byte("y")})
	seed, err := os.ReadFile(img)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, img []byte) {
		fsys, err := ext4read.Open(bytes.NewReader(img), int64(len(img)), ext4read.Options{MaxEntries: 1000, MaxDepth: 32})
		if err != nil {
			return
		}
		base, err := ext4read.Open(bytes.NewReader(seed), int64(len(seed)), ext4read.Options{})
		if err != nil {
			t.Fatal(err)
		}
		// Sizes may say terabytes of holes: stop early.
		ctx := context.Background()
		ext4layer.Full(ctx, &capped{n: 16 << 20}, fsys, fsys.Root(), ext4layer.Options{})
		ext4layer.OverlayUpper(ctx, &capped{n: 16 << 20}, fsys, "/upper", ext4layer.Options{})
		ext4layer.Changes(ctx, &capped{n: 16 << 20}, base, fsys, ext4layer.Options{})
		ext4layer.Changes(ctx, &capped{n: 16 << 20}, fsys, base, ext4layer.Options{SharedBlocks: true})
	})
}

// capped takes n bytes, then fails.
type capped struct{ n int }

func (c *capped) Write(p []byte) (int, error) {
	if c.n -= len(p); c.n < 0 {
		return 0, io.ErrShortWrite
	}
	return len(p), nil
}
