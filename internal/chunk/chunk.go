// Package chunk reads streams in fixed-size chunks.
package chunk

import "io"

// Fill reads until buf is full (nil error) or r ends. Unlike
// io.ReadFull, it passes r's own error on: io.EOF when the stream ended
// cleanly, whatever else (a decompressor's io.ErrUnexpectedEOF for a
// truncated stream) when it did not, so that a short last chunk and a
// cut-off stream stay apart.
func Fill(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
