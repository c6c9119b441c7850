package directio

import (
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

// TestStream writes streams in pieces of every size, crossing buffers
// and ending off a block boundary, and reads back exactly what went in.
func TestStream(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	for _, size := range []int{0, 1, Align, 3*streamBufSize + 4096 + 123, 2 * streamBufSize * streamBuffers} {
		want := make([]byte, size)
		rng.Read(want)
		path := filepath.Join(t.TempDir(), "blob")
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		s := NewStream(f)
		for p := want; len(p) > 0; {
			n := min(len(p), 1+rng.Intn(3*streamBufSize/2))
			if m, err := s.Write(p[:n]); err != nil || m != n {
				t.Fatalf("size %d: Write = %d, %v; want %d", size, m, err, n)
			}
			p = p[n:]
		}
		if err := s.Close(); err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		f.Close()
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("size %d: read back %d bytes that differ from the %d written", size, len(got), len(want))
		}
	}
}
