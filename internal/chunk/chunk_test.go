package chunk

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

func TestFill(t *testing.T) {
	buf := make([]byte, 4)
	r := iotest.OneByteReader(bytes.NewReader([]byte("abcdef")))
	if n, err := Fill(r, buf); n != 4 || err != nil || string(buf) != "abcd" {
		t.Errorf("first chunk: %d %v %q", n, err, buf)
	}
	if n, err := Fill(r, buf); n != 2 || err != io.EOF || string(buf[:n]) != "ef" {
		t.Errorf("last chunk: %d %v", n, err)
	}
	cut := errors.New("cut")
	if n, err := Fill(iotest.ErrReader(cut), buf); n != 0 || err != cut {
		t.Errorf("an error is passed on: %d %v", n, err)
	}
}
