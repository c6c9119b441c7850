package layer

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Compression is how a layer's tar is stored in its blob.
type Compression int

const (
	// Unsaid: the media type does not say; the data decides.
	Unsaid Compression = iota
	Plain
	Gzip
	Zstd
)

func (c Compression) String() string {
	return [...]string{"unsaid", "tar", "gzip", "zstd"}[c]
}

var magics = map[Compression][]byte{
	Gzip: {0x1f, 0x8b},
	Zstd: {0x28, 0xb5, 0x2f, 0xfd},
}

// deflateMagic starts a gzip stream of deflate data.
var deflateMagic = []byte{0x1f, 0x8b, 0x08}

// HeadSize is how much of a blob DetectCompression looks at: one tar
// header block.
const HeadSize = 512

// DetectCompression decides how a blob is compressed from its media type
// and its first HeadSize bytes (fewer if the blob is shorter). It is the
// only place kiln decides this.
//
// A tar's first bytes are its first entry's name, and a name may start
// with a compressor's magic, so a media type that says tar is
// authoritative: such a blob is never decompressed. Nor is a blob whose
// first block is a valid tar header, whatever its label and first bytes
// (a compressed stream does not checksum as a tar header). Otherwise a
// media type that says gzip or zstd is taken when the data starts with
// that magic, and the magic decides when the media type does not say or
// names a compression the data cannot have (some tools label plain tars
// as gzip).
func DetectCompression(mediaType string, head []byte) Compression {
	said := mediaTypes[mediaType]
	switch {
	case said == Plain, isTarHeader(head):
		return Plain
	case said != Unsaid && bytes.HasPrefix(head, magics[said]):
		return said
	}
	for _, c := range []Compression{Gzip, Zstd} {
		if bytes.HasPrefix(head, magics[c]) {
			return c
		}
	}
	return Plain
}

// isTarHeader says whether b starts with a tar header block whose
// checksum verifies, the way archive/tar checks it: the unsigned or (for
// old tars) signed sum of the block's bytes, the checksum field counted
// as spaces. That holds for ustar, GNU, PAX and old-style headers alike.
func isTarHeader(b []byte) bool {
	if len(b) < HeadSize {
		return false
	}
	field := bytes.Trim(b[148:156], " \x00")
	want, err := strconv.ParseUint(string(field), 8, 64)
	if err != nil {
		return false
	}
	var unsigned, signed int64
	for i, c := range b[:HeadSize] {
		if i >= 148 && i < 156 {
			c = ' '
		}
		unsigned += int64(c)
		signed += int64(int8(c))
	}
	return int64(want) == unsigned || int64(want) == signed
}

// openTar returns the tar that the blob in holds, compressed as
// DetectCompression decides.
func openTar(in *bufio.Reader, mediaType string) (io.ReadCloser, error) {
	head, _ := in.Peek(HeadSize)
	switch DetectCompression(mediaType, head) {
	case Gzip:
		// A command for deflate, which is all gzip has; Go's reader
		// otherwise, and for the error of a stream that is not.
		if path := gzipCommand(); path != "" && bytes.HasPrefix(head, deflateMagic) {
			// One that cannot start has read nothing: Go's reader
			// takes over.
			if g, err := newGzipStream(path, in); err == nil {
				return g, nil
			}
		}
		zr, err := gzip.NewReader(in)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return zr, nil
	case Zstd:
		// The window a frame declares is allocated up front: cap it where
		// the zstd tool does by default (128 MiB), not at the library's
		// 512 MiB, which a 30-byte blob could ask for.
		zr, err := zstd.NewReader(in, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return zr.IOReadCloser(), nil
	}
	return io.NopCloser(in), nil
}

// Uncompressed returns the tar a blob holds, compressed as
// DetectCompression decides from mediaType ("" when nothing says) and the
// blob's first bytes. Closing it does not close blob.
func Uncompressed(blob io.Reader, mediaType string) (io.ReadCloser, error) {
	return openTar(bufio.NewReader(blob), mediaType)
}
