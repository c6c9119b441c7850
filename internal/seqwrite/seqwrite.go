// Package seqwrite buffers writes at offsets of a file that mostly follow
// one another, as when an image or a data file is written front to back,
// so that many small pieces cost few system calls.
package seqwrite

import "os"

// BlockSize is the block a write's tail is padded to when the next write
// starts at the following block.
const BlockSize = 4096

// Writer buffers writes to one file.
type Writer struct {
	f      *os.File
	off    int64 // where buf goes
	buf    []byte
	direct int // writes at least this long skip the buffer
}

// New returns a Writer with a buffer of size bytes; writes of a quarter
// of that or more go straight to the file.
func New(f *os.File, size int) *Writer {
	return &Writer{f: f, buf: make([]byte, 0, size), direct: size / 4}
}

// WriteAt writes p at off. When off is the start of the block after the
// one the buffered data ends in, the rest of that block is written as
// zeros; any other gap starts a new buffer, so that the blocks it skips
// (a hole, or what another write put there) are never touched.
func (w *Writer) WriteAt(p []byte, off int64) error {
	end := w.off + int64(len(w.buf))
	follows := off == end || end%BlockSize != 0 && off == (end/BlockSize+1)*BlockSize
	if len(w.buf) > 0 && follows && len(p) < w.direct && len(w.buf)+int(off-end)+len(p) <= cap(w.buf) {
		w.buf = append(w.buf, zeros[:off-end]...)
		w.buf = append(w.buf, p...)
		return nil
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(p) >= w.direct {
		_, err := w.f.WriteAt(p, off)
		return err
	}
	w.off, w.buf = off, append(w.buf, p...)
	return nil
}

// Flush writes what is buffered.
func (w *Writer) Flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.f.WriteAt(w.buf, w.off)
	w.buf = w.buf[:0]
	return err
}

var zeros [BlockSize]byte
