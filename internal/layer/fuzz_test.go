package layer

import (
	"bytes"
	stdgzip "compress/gzip"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// fuzzMediaTypes are every media type kiln reads and one it does not.
var fuzzMediaTypes = func() []string {
	var types []string
	for mt := range mediaTypes {
		types = append(types, mt)
	}
	slices.Sort(types)
	return append(types, "application/vnd.example.unknown")
}()

// fuzzReadCap bounds what one input may decompress to: a few bytes of
// zstd can say gigabytes.
const fuzzReadCap = 16 << 20

// FuzzReader feeds any bytes as a layer blob under every media type, with
// right, wrong or no digests. NewReader must refuse the media type or
// return a stream; the stream must end, with an error naming the layer or
// with content that a reference decoder agrees with and digests that
// match it; Close must return, however little was read.
func FuzzReader(f *testing.F) {
	tarball := []byte("a tar stream, as far as the reader knows")
	gzipped := gz(f, tarball)
	f.Add([]byte{}, uint8(0))
	f.Add(tarball, uint8(0b1111))
	f.Add(gzipped, uint8(0b1111))
	f.Add(gzipped, uint8(0b0111))
	f.Add(gzipped[:len(gzipped)-5], uint8(0b1111))
	f.Add(append(gz(f, tarball[:10]), gz(f, tarball[10:])...), uint8(0b0101)) // two gzip members
	f.Add(append(gz(f, tarball), "trailing"...), uint8(0b0001))
	f.Add(zst(f, tarball), uint8(0b1111))
	f.Add(append(zst(f, tarball[:10]), zst(f, tarball[10:])...), uint8(0b0100)) // two zstd frames
	f.Add(zstdWindow(f, 29), uint8(0b0101))
	f.Add([]byte{0x1f, 0x8b}, uint8(0))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd}, uint8(0))
	f.Fuzz(func(t *testing.T, blob []byte, digests uint8) {
		for _, mt := range fuzzMediaTypes {
			want, wantOK := referenceDecode(mt, blob)
			desc := Descriptor{MediaType: mt}
			switch digests & 3 {
			case 1:
				desc.Digest = digest.FromBytes(blob)
			case 2:
				desc.Digest = digest.FromString("not the blob")
			}
			switch digests >> 2 & 3 {
			case 1:
				if wantOK {
					desc.DiffID = digest.FromBytes(want)
				}
			case 2:
				desc.DiffID = digest.FromString("not the content")
			}
			fuzzRead(t, blob, desc, want, wantOK)
		}
	})
}

// TestZstdWindow: a frame may declare a window of up to 512 MiB, which
// the decoder allocates before it reads a byte; kiln decodes windows of
// up to 128 MiB, as the zstd tool does by default.
func TestZstdWindow(t *testing.T) {
	for wlog, ok := range map[int]bool{20: true, 23: true, 28: false, 29: false} {
		blob := zstdWindow(t, wlog)
		out, err := io.ReadAll(mustReader(t, blob))
		var le *Error
		if ok && (err != nil || len(out) != 3000) {
			t.Errorf("window of 2^%d bytes: %d bytes, %v", wlog, len(out), err)
		}
		if !ok && (!errors.As(err, &le) || le.Digest != digest.FromBytes(blob) || !strings.Contains(err.Error(), "windows of up to 128 MiB")) {
			t.Errorf("window of 2^%d bytes: %v, want a layer error naming the limit", wlog, err)
		}
	}
}

func mustReader(t *testing.T, blob []byte) *Reader {
	t.Helper()
	r, err := NewReader(bytes.NewReader(blob), Descriptor{MediaType: MediaTypeDockerLayer, Digest: digest.FromBytes(blob)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// zstdWindow is a zstd frame of 3000 bytes that declares a window of
// 2^wlog bytes.
func zstdWindow(t testing.TB, wlog int) []byte {
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf, zstd.WithWindowSize(1<<20), zstd.WithSingleSegment(false))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(bytes.Repeat([]byte("abc"), 1000))
	w.Close()
	b := buf.Bytes()
	if b[4]&0x20 != 0 {
		t.Fatal("a single-segment frame has no window descriptor")
	}
	b[5] = byte(wlog-10) << 3 // exponent, no mantissa
	return b
}

// fuzzRead reads one blob as desc says, within a deadline, and checks
// what came out.
func fuzzRead(t *testing.T, blob []byte, desc Descriptor, want []byte, wantOK bool) {
	r, err := NewReader(bytes.NewReader(blob), desc)
	if err != nil {
		var le *Error
		if !errors.As(err, &le) || !errors.Is(err, ErrUnknownMediaType) {
			t.Fatalf("%s: NewReader: %v, want only unknown media types refused", desc.MediaType, err)
		}
		return
	}
	if CheckMediaType(desc.MediaType) != nil {
		t.Fatalf("%s: an unknown media type was accepted", desc.MediaType)
	}
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer r.Close()
		out, err := io.ReadAll(io.LimitReader(r, fuzzReadCap+1))
		done <- result{out, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(time.Minute):
		t.Fatalf("%s: reading a %d-byte blob did not end", desc.MediaType, len(blob))
	}
	if len(res.out) > fuzzReadCap {
		return // stopped early, and Close returned
	}
	if res.err != nil {
		var le *Error
		if !errors.As(res.err, &le) || le.Digest != desc.Digest {
			t.Fatalf("%s: error %v does not name the layer", desc.MediaType, res.err)
		}
		return
	}
	if desc.Digest != "" && desc.Digest != digest.FromBytes(blob) {
		t.Fatalf("%s: a blob that is not what its digest says was read without error", desc.MediaType)
	}
	if desc.DiffID != "" && desc.DiffID != digest.FromBytes(res.out) {
		t.Fatalf("%s: content that is not what its diffID says was read without error", desc.MediaType)
	}
	if got := r.DiffID(); got != digest.FromBytes(res.out) {
		t.Fatalf("%s: DiffID %s is not the digest of what was read", desc.MediaType, got)
	}
	if wantOK && !bytes.Equal(res.out, want) {
		t.Fatalf("%s: read %d bytes, the reference decoder %d", desc.MediaType, len(res.out), len(want))
	}
}

// referenceDecode decodes a blob with other decoders than the reader's
// (the standard library's gzip), as DetectCompression says from the
// media type and first bytes; false if they fail or the content is past
// fuzzReadCap.
func referenceDecode(mediaType string, blob []byte) ([]byte, bool) {
	var src io.Reader
	switch DetectCompression(mediaType, blob[:min(len(blob), HeadSize)]) {
	case Gzip:
		zr, err := stdgzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			return nil, false
		}
		src = zr
	case Zstd:
		zr, err := zstd.NewReader(bytes.NewReader(blob), zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return nil, false
		}
		defer zr.Close()
		src = zr
	default:
		return blob, true
	}
	out, err := io.ReadAll(io.LimitReader(src, fuzzReadCap+1))
	if err != nil || len(out) > fuzzReadCap {
		return nil, false
	}
	return out, true
}
