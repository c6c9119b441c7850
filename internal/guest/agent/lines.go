package agent

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// lineReader reads newline-terminated lines of bounded length.
type lineReader struct {
	r   *bufio.Reader
	max int
	buf []byte
}

func newLineReader(r io.Reader, max int) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// next returns the next line without its line ending and with surrounding
// whitespace removed. A line longer than the limit is consumed and reported
// with tooLong set. At end of input a final unterminated line is returned
// before the error.
func (l *lineReader) next() (line []byte, tooLong bool, err error) {
	l.buf = l.buf[:0]
	for {
		chunk, err := l.r.ReadSlice('\n')
		if !tooLong {
			if len(l.buf)+len(chunk) > l.max+2 { // +2 for "\r\n"
				tooLong = true
				l.buf = l.buf[:0]
			} else {
				l.buf = append(l.buf, chunk...)
			}
		}
		switch {
		case err == nil:
			return bytes.TrimSpace(l.buf), tooLong, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case len(l.buf) > 0 && !tooLong:
			// Hand out the last, unterminated line; the error comes
			// with the next call.
			return bytes.TrimSpace(l.buf), false, nil
		default:
			return nil, tooLong, err
		}
	}
}
