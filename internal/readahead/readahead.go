// Package readahead reads a stream in a goroutine of its own, so that
// receiving it (a registry's response, a checked blob) overlaps with
// whatever consumes it, such as a decompressor.
package readahead

import (
	"errors"
	"hash"
	"io"
	"sync"

	"github.com/kilnfs/kiln/internal/chunk"
)

// chunkSize is what one read hands over: large enough that the hand-over
// costs little, small enough that a few in flight stay in the CPU's cache.
const chunkSize = 256 << 10

// Reader passes on what a goroutine reads ahead, up to four chunks.
type Reader struct {
	chunks chan []byte
	free   chan []byte // chunks read, for the goroutine to fill again
	done   chan struct{}
	stop   sync.Once
	buf    []byte // the chunk being read
	cur    []byte // what is left of it
	err    error  // set before chunks is closed
}

// errStopped is what Read returns after Stop, rather than a short stream
// that looks whole.
var errStopped = errors.New("read-ahead stopped")

// New starts reading r; h, when not nil, hashes what was read, in the
// reading goroutine. The caller must call Stop.
func New(r io.Reader, h hash.Hash) *Reader {
	// Every chunk in flight can be free at once: in the channel, in the
	// goroutine's hands, and the one being read.
	a := &Reader{chunks: make(chan []byte, 4), free: make(chan []byte, 6), done: make(chan struct{})}
	go func() {
		defer close(a.chunks)
		for {
			// Memory used before costs no page faults, unlike new.
			var buf []byte
			select {
			case buf = <-a.free:
				buf = buf[:chunkSize]
			default:
				buf = make([]byte, chunkSize)
			}
			n, err := chunk.Fill(r, buf)
			if n > 0 {
				if h != nil {
					h.Write(buf[:n])
				}
				select {
				case a.chunks <- buf[:n]:
				case <-a.done:
					return
				}
			}
			if err != nil {
				if err != io.EOF {
					a.err = err
				}
				return
			}
		}
	}()
	return a
}

// Read implements io.Reader; it returns the source's error once the
// chunks read before it are passed on.
func (a *Reader) Read(p []byte) (int, error) {
	for len(a.cur) == 0 {
		if a.buf != nil {
			// Read through: its bytes are the caller's copies now.
			select {
			case a.free <- a.buf:
			default:
			}
			a.buf = nil
		}
		c, ok := <-a.chunks
		if !ok {
			if a.err != nil {
				return 0, a.err
			}
			return 0, io.EOF
		}
		a.buf, a.cur = c, c
	}
	n := copy(p, a.cur)
	a.cur = a.cur[n:]
	return n, nil
}

// Stop ends the reading goroutine and waits for it; a Read after it
// fails. A read the goroutine is blocked in must be ended first (by
// closing the source), or Stop waits for it.
func (a *Reader) Stop() {
	a.stop.Do(func() { close(a.done) })
	for range a.chunks {
	}
	// The goroutine has ended: nothing else writes these now.
	a.buf, a.cur, a.err = nil, nil, errStopped
}
