package share

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// testRootfs is an image of data, a long stretch of zeros and a short
// last block, bigger than expand's buffers.
func testRootfs() []byte {
	img := make([]byte, 9<<20+1234)
	rng := rand.New(rand.NewSource(1))
	rng.Read(img[:3<<20+100])
	copy(img[5<<20:], bytes.Repeat([]byte("kiln"), 1<<18))
	rng.Read(img[len(img)-3000:])
	return img
}

func zstdOf(t *testing.T, b []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

func TestExpand(t *testing.T) {
	img := testRootfs()
	blob := zstdOf(t, img)
	for _, direct := range []bool{true, false} {
		t.Run(map[bool]string{true: "direct", false: "buffered"}[direct], func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "rootfs.ext4")
			f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := expand(context.Background(), bytes.NewReader(blob), f, int64(len(img)), direct)
			if err != nil {
				t.Fatal(err)
			}
			if got != digest.FromBytes(img) {
				t.Fatalf("digest %s, want %s", got, digest.FromBytes(img))
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b, img) {
				t.Fatalf("the file (%d bytes) is not the image (%d bytes)", len(b), len(img))
			}
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			if st.Blocks*512 >= int64(len(img)) {
				t.Errorf("%d bytes allocated for an image of %d with a 2 MiB hole: the zeros were written", st.Blocks*512, len(img))
			}
		})
	}
}

func TestExpandRefuses(t *testing.T) {
	img := testRootfs()
	blob := zstdOf(t, img)
	for name, c := range map[string]struct {
		blob []byte
		size int64
		want string
	}{
		"longer":    {blob, int64(len(img)) - 4096, "longer than"},
		"shorter":   {blob, int64(len(img)) + 1, "the artifact says"},
		"truncated": {blob[:len(blob)/2], int64(len(img)), "decompressing"},
	} {
		t.Run(name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "rootfs.ext4"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			_, err = expand(context.Background(), bytes.NewReader(c.blob), f, c.size, true)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("expand: %v, want an error saying %q", err, c.want)
			}
		})
	}
}
