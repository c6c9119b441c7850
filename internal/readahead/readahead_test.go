package readahead

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand"
	"testing"
	"testing/iotest"
)

func TestPassesAndHashes(t *testing.T) {
	data := make([]byte, 3*chunkSize+12345)
	rand.New(rand.NewSource(1)).Read(data)
	h := sha256.New()
	r := New(iotest.HalfReader(bytes.NewReader(data)), h)
	defer r.Stop()
	got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(r, 100)))
	if err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(got, rest...), data) {
		t.Fatal("what was read is not what the source held")
	}
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("the hash is not the source's")
	}
}

func TestErrorAfterData(t *testing.T) {
	boom := errors.New("connection reset")
	r := New(io.MultiReader(bytes.NewReader([]byte("abc")), iotest.ErrReader(boom)), nil)
	defer r.Stop()
	got, err := io.ReadAll(r)
	if string(got) != "abc" || !errors.Is(err, boom) {
		t.Fatalf("got %q, %v; want the data, then the source's error", got, err)
	}
}

// Stop ends the goroutine while it waits to hand over a chunk nobody reads.
func TestStopUnread(t *testing.T) {
	r := New(bytes.NewReader(make([]byte, 10*chunkSize)), nil)
	var one [1]byte
	if _, err := r.Read(one[:]); err != nil {
		t.Fatal(err)
	}
	r.Stop()
	r.Stop() // twice is harmless
	if _, err := r.Read(one[:]); err == nil || err == io.EOF {
		t.Errorf("a Read after Stop: %v, want an error", err)
	}
}

// BenchmarkRead passes 64 MiB through a Reader into a 32 KiB buffer.
func BenchmarkRead(b *testing.B) {
	data := make([]byte, 64<<20)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	buf := make([]byte, 32<<10)
	for b.Loop() {
		r := New(bytes.NewReader(data), nil)
		if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{r}, buf); err != nil {
			b.Fatal(err)
		}
		r.Stop()
	}
}
