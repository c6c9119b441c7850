// Package seqwrite buffers writes at offsets of a file that mostly follow
// one another, as when an image or a data file is written front to back,
// so that many small pieces cost few system calls.
package seqwrite

import (
	"os"

	"golang.org/x/sys/unix"
)

// BlockSize is the block a write's tail is padded to when the next write
// starts at the following block.
const BlockSize = 4096

// Writer buffers writes to one file.
type Writer struct {
	f      *os.File
	off    int64 // where buf goes
	buf    []byte
	direct int // writes at least this long skip the buffer

	// behind, when set, is how many bytes written start their writeback
	// (see WriteBehind); lo, hi and pending span those not started yet.
	behind, lo, hi, pending int64
}

// New returns a Writer with a buffer of size bytes; writes of a quarter
// of that or more go straight to the file.
func New(f *os.File, size int) *Writer {
	return &Writer{f: f, buf: make([]byte, 0, size), direct: size / 4}
}

// WriteBehind makes the Writer start the writeback of what it wrote
// every n bytes, without waiting for it: a file that is synced once
// complete then has little left to write, and the disk works while the
// rest is produced rather than after. The pages stay in the page cache
// for whoever reads the file next.
func (w *Writer) WriteBehind(n int64) { w.behind = n }

// wrote notes a write of n bytes at off for WriteBehind.
func (w *Writer) wrote(off int64, n int) {
	if w.behind <= 0 || n == 0 {
		return
	}
	end := off + int64(n)
	if w.pending == 0 {
		w.lo, w.hi = off, end
	} else {
		w.lo, w.hi = min(w.lo, off), max(w.hi, end)
	}
	w.pending += int64(n)
	if w.pending >= w.behind {
		// A hint: where the file system cannot, the final sync does it
		// all, as without it.
		_ = unix.SyncFileRange(int(w.f.Fd()), w.lo, w.hi-w.lo, unix.SYNC_FILE_RANGE_WRITE)
		w.pending = 0
	}
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
		n, err := w.f.WriteAt(p, off)
		w.wrote(off, n)
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
	n, err := w.f.WriteAt(w.buf, w.off)
	w.wrote(w.off, n)
	w.buf = w.buf[:0]
	return err
}

var zeros [BlockSize]byte
