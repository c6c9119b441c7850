package layer

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func needGzipCommand(t *testing.T) string {
	t.Helper()
	path := gzipCommand()
	if path == "" {
		t.Skip("neither igzip (Debian's isal) nor unpigz is installed, or containerd's switches turn them off")
	}
	return path
}

// TestGzipStream: the command's output is the stream; a source that
// fails is the cause reported, not the command's complaint about a
// stream that stopped; a truncated stream is reported as such.
func TestGzipStream(t *testing.T) {
	path := needGzipCommand(t)
	blob := gz(t, payload)
	read := func(src io.Reader) ([]byte, error) {
		g, err := newGzipStream(path, src)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		return io.ReadAll(g)
	}
	if got, err := read(iotest.HalfReader(bytes.NewReader(blob))); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("inflating: %d bytes, %v; want the payload", len(got), err)
	}
	boom := errors.New("connection reset")
	if _, err := read(io.MultiReader(bytes.NewReader(blob[:len(blob)/2]), iotest.ErrReader(boom))); !errors.Is(err, boom) {
		t.Errorf("a source that fails: %v, want its error", err)
	}
	_, err := read(bytes.NewReader(blob[:len(blob)/2]))
	var c *corruptGzip
	if !errors.As(err, &c) || !strings.Contains(err.Error(), "truncated or corrupt") {
		t.Errorf("a truncated stream: %v, want it said", err)
	}
}

// TestGzipStreamClose: Close stops a command that has not finished, and
// nothing reads the source after it returns.
func TestGzipStreamClose(t *testing.T) {
	path := needGzipCommand(t)
	src := &countingSource{r: bytes.NewReader(gz(t, payload))}
	g, err := newGzipStream(path, iotest.OneByteReader(src))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(g, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	g.Close()
	n := src.reads()
	if _, err := g.Read(make([]byte, 10)); err == nil {
		t.Error("a Read after Close succeeded")
	}
	if src.reads() != n {
		t.Error("the source was read after Close returned")
	}
}

type countingSource struct {
	r io.Reader
	n int
}

func (c *countingSource) Read(p []byte) (int, error) {
	c.n++
	return c.r.Read(p)
}

func (c *countingSource) reads() int { return c.n }
