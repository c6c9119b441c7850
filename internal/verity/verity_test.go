package verity_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/verity/veritytest"
)

// newDisk formats an ext4 filesystem of size bytes at dir/name.
func newDisk(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := ext4.Format(context.Background(), p, size, "", "verity-test", t.TempDir()); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAppendVeritysetupAccepts(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int64{4 << 20, 64<<20 + 4096*3} {
		p := newDisk(t, dir, "disk-"+strconv.FormatInt(size, 10), size)
		info, err := verity.Append(p, "key-1", true)
		if err != nil {
			t.Fatal(err)
		}
		if info.DataSize != size || info.HashOffset != size || info.DataBlocks != size/4096 || info.HashStartBlock != size/4096+1 {
			t.Fatalf("size %d: layout %+v", size, info)
		}
		if err := veritytest.Verify(t, p, info); err != nil {
			t.Fatalf("size %d: veritysetup verify: %v", size, err)
		}
		got, err := verity.Describe(p)
		if err != nil {
			t.Fatal(err)
		}
		if got != info {
			t.Fatalf("Describe = %+v, Append said %+v", got, info)
		}
		// The filesystem's own size stays in its superblock: e2fsck
		// checks the whole disk as it is, tree and all.
		if out, err := exec.Command("e2fsck", "-fn", p).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck -fn on the disk with its tree: %v\n%s", err, out)
		}
	}
}

func TestFlippedDataByteFails(t *testing.T) {
	p := newDisk(t, t.TempDir(), "disk", 8<<20)
	info, err := verity.Append(p, "key-1", false)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	const at = 3<<20 + 17 // a free block: the filesystem does not mind
	f.ReadAt(b, at)
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := veritytest.Verify(t, p, info); err == nil {
		t.Fatal("veritysetup verify accepted a disk with a flipped data byte")
	}
}

func TestAppendReproducible(t *testing.T) {
	dir := t.TempDir()
	a, b := newDisk(t, dir, "a", 16<<20), newDisk(t, dir, "b", 16<<20)
	ia, err := verity.Append(a, "key-1", false)
	if err != nil {
		t.Fatal(err)
	}
	// Appending twice replaces the tree: the bytes are those of once.
	if _, err := verity.Append(b, "key-1", false); err != nil {
		t.Fatal(err)
	}
	ib, err := verity.Append(b, "key-1", false)
	if err != nil {
		t.Fatal(err)
	}
	ba, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if ia != ib || !bytes.Equal(ba, bb) {
		t.Fatalf("two appends to the same filesystem differ: %+v vs %+v", ia, ib)
	}
	ic, err := verity.Append(b, "key-2", false)
	if err != nil {
		t.Fatal(err)
	}
	if ic.Salt == ia.Salt || ic.RootHash == ia.RootHash {
		t.Fatal("another identity gave the same salt and root hash")
	}
}

func TestTable(t *testing.T) {
	info := verity.Info{RootHash: "ab", Algorithm: "sha256", Salt: "cd", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 256, DataSize: 1 << 20, HashOffset: 1 << 20, HashStartBlock: 257}
	want := "0 2048 verity 1 /dev/vda /dev/vda 4096 4096 256 257 sha256 ab cd"
	if got := info.Table("/dev/vda"); got != want {
		t.Fatalf("Table = %q, want %q", got, want)
	}
}
