package directio

import (
	"errors"
	"os"
	"sync"
)

// Stream writes a stream to a file front to back around the page cache,
// gathered into aligned buffers that are written while the next ones
// fill: for a blob kiln keeps for later and does not read back now.
type Stream struct {
	w    *Writer
	free chan []byte
	wg   sync.WaitGroup
	buf  []byte // being filled
	off  int64  // where buf goes

	closed   bool
	closeErr error
}

// errStreamClosed is what a Write after Close returns.
var errStreamClosed = errors.New("directio: write to a closed stream")

const streamBuffers, streamBufSize = 6, 1 << 20

// NewStream starts a Stream into f, which must be open for writing and
// empty; f stays the caller's.
func NewStream(f *os.File) *Stream {
	s := &Stream{w: New(f, 4, true), free: make(chan []byte, streamBuffers)}
	for range streamBuffers {
		s.free <- Buffer(streamBufSize)
	}
	return s
}

// Write takes p; it returns the first error of an earlier write. A
// Stream is used by one goroutine at a time.
func (s *Stream) Write(p []byte) (int, error) {
	if s.closed {
		return 0, errStreamClosed
	}
	n := len(p)
	for len(p) > 0 {
		if s.buf == nil {
			s.buf = (<-s.free)[:0]
		}
		c := copy(s.buf[len(s.buf):cap(s.buf)], p)
		s.buf, p = s.buf[:len(s.buf)+c], p[c:]
		if len(s.buf) == cap(s.buf) {
			if err := s.flush(); err != nil {
				return n - len(p), err
			}
		}
	}
	return n, nil
}

// flush queues the buffer being filled.
func (s *Stream) flush() error {
	buf := s.buf
	s.buf = nil
	s.wg.Add(1)
	err := s.w.WriteAt(buf, s.off, func() {
		s.free <- buf[:cap(buf)]
		s.wg.Done()
	})
	s.off += int64(len(buf))
	return err
}

// Close writes what is left, waits for every write and cuts the file to
// the bytes written; the file is not synced. A second Close returns what
// the first did.
func (s *Stream) Close() error {
	if s.closed {
		return s.closeErr
	}
	s.closed = true
	s.closeErr = s.close()
	return s.closeErr
}

func (s *Stream) close() error {
	size := s.off + int64(len(s.buf))
	var err error
	if n := len(s.buf); n > 0 {
		// The short last block padded to a whole one, so that it too is
		// written direct (never through the cache beside direct writes
		// of the same page); the Truncate cuts the padding off.
		if tail := n % Align; tail != 0 {
			s.buf = s.buf[:n+Align-tail]
			clear(s.buf[n:])
		}
		err = s.flush()
	}
	if cerr := s.w.Close(); err == nil {
		err = cerr
	}
	s.wg.Wait()
	if err != nil {
		return err
	}
	return s.w.f.Truncate(size)
}
