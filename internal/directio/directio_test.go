package directio

import (
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
)

// TestRuns writes aligned runs (direct where the file system allows it
// and the writer is asked to) and unaligned ones (through the page
// cache) of one file, several at a time, and reads back what each put
// where.
func TestRuns(t *testing.T) {
	for _, direct := range []bool{true, false} {
		t.Run(map[bool]string{true: "direct", false: "buffered"}[direct], func(t *testing.T) { testRuns(t, direct) })
	}
}

func testRuns(t *testing.T, direct bool) {
	path := filepath.Join(t.TempDir(), "image")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 8 << 20
	want := make([]byte, size)
	w := New(f, 3, direct)
	var done atomic.Int32
	rng := rand.New(rand.NewSource(1))
	runs := []struct{ off, n int }{
		{0, 1 << 20},          // aligned
		{3 << 20, 64 << 10},   // aligned, after a hole
		{5<<20 + 100, 5000},   // unaligned offset and length
		{6 << 20, 4096 + 512}, // unaligned length
		{7 << 20, 1 << 20},    // aligned, to the end
	}
	for _, r := range runs {
		p := Buffer(r.n)
		if r.off%Align != 0 {
			p = make([]byte, r.n)
		}
		rng.Read(p)
		copy(want[r.off:], p)
		// Once done is called the buffer is the caller's again: what
		// it then holds must not reach the file.
		if err := w.WriteAt(p, int64(r.off), func() { clear(p); done.Add(1) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("a second Close: %v", err)
	}
	if got := done.Load(); got != int32(len(runs)) {
		t.Fatalf("done was called %d times for %d runs", got, len(runs))
	}
	if w.Direct() {
		t.Fatal("Direct says every run went around the page cache, though some were unaligned")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the file does not hold what was written")
	}
}

// TestDirect checks that aligned runs go around the page cache where
// the file system supports it.
func TestDirect(t *testing.T) {
	dir := t.TempDir()
	probe, err := os.OpenFile(filepath.Join(dir, "probe"), os.O_WRONLY|os.O_CREATE|directFlag, 0o600)
	if err != nil {
		t.Skipf("the file system of %s refuses O_DIRECT: %v", dir, err)
	}
	probe.Close()
	f, err := os.Create(filepath.Join(dir, "image"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := New(f, 2, true)
	p := Buffer(1 << 20)
	for i := range p {
		p[i] = byte(i * 7)
	}
	for i := range 4 {
		if err := w.WriteAt(p, int64(i)<<20, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !w.Direct() {
		t.Fatal("aligned runs went through the page cache")
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat(p, 4)) {
		t.Fatal("the file does not hold what was written")
	}
}

// TestFirstError: a run that fails makes Close, and every later WriteAt,
// report it, and the runs queued after it are not written; done is
// still called once for each run.
func TestFirstError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Read-only: the writer must not write through a descriptor of its
	// own either, and the kernel refuses the first run.
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := New(f, 1, true)
	var calls atomic.Int32
	runs := 0
	for ; runs < 100 && err == nil; runs++ {
		err = w.WriteAt(Buffer(Align), int64(runs)*Align, func() { calls.Add(1) })
	}
	if err == nil {
		t.Fatal("WriteAt after a failed run reports no error")
	}
	if cerr := w.Close(); cerr == nil {
		t.Fatal("Close reports no error after a failed run")
	}
	if got := calls.Load(); got != int32(runs) {
		t.Fatalf("done was called %d times for %d runs", got, runs)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != 0 {
		t.Fatalf("the read-only file was written: %v, %v", fi.Size(), err)
	}
}

func TestBufferAligned(t *testing.T) {
	for _, n := range []int{Align, 1 << 20, 3*Align + 5} {
		b := Buffer(n)
		if len(b) != n || cap(b) != n || !aligned(b[:n/Align*Align], 0) {
			t.Fatalf("Buffer(%d): len %d, cap %d, aligned %v", n, len(b), cap(b), aligned(b[:n/Align*Align], 0))
		}
	}
}

// TestWriteFile writes whole files direct where it can (an aligned
// buffer), with a tail through the page cache, and through the page
// cache alone (a buffer that is not aligned), and reads back each.
func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewSource(2))
	for name, p := range map[string][]byte{
		"aligned":      Buffer(64 << 10),
		"aligned+tail": Buffer(64<<10 + 100)[:64<<10+100],
		"unaligned":    make([]byte, 64<<10+Align+1)[1:],
		"short":        Buffer(100),
		"empty":        nil,
	} {
		rng.Read(p)
		path := filepath.Join(dir, name)
		// An older, longer file of the name is replaced.
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := WriteFile(path, p, 0o600); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, p) {
			t.Errorf("%s: read back %d bytes that differ from the %d written", name, len(got), len(p))
		}
	}
}
