package seqwrite

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteAt: the rest of a block is zeroed, other gaps keep what is
// there, and out-of-order and large writes land where they should, with
// and without their writeback started behind them.
func TestWriteAt(t *testing.T) {
	for _, behind := range []int64{0, 1, 2 * BlockSize} {
		testWriteAt(t, behind)
	}
}

func testWriteAt(t *testing.T, behind int64) {
	path := filepath.Join(t.TempDir(), "f")
	before := bytes.Repeat([]byte{0xEE}, 8*BlockSize)
	if err := os.WriteFile(path, before, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := New(f, 4*BlockSize)
	w.WriteBehind(behind)
	want := append([]byte(nil), before...)
	put := func(p []byte, off int64) {
		t.Helper()
		if err := w.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	put([]byte("abc"), 0)
	put([]byte("def"), 3)
	put([]byte("next block"), BlockSize) // the rest of block 0 is zeroed
	copy(want[6:BlockSize], make([]byte, BlockSize-6))
	put([]byte("two blocks on"), 3*BlockSize) // block 2 keeps its bytes
	put([]byte("back"), 2*BlockSize+100)      // out of order
	put(bytes.Repeat([]byte{1}, BlockSize), 6*BlockSize)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("write-behind %d: byte %d is %#x, want %#x", behind, i, got[i], want[i])
			}
		}
	}
}
