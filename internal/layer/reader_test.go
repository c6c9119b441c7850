package layer

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

var payload = bytes.Repeat([]byte("kiln layer payload "), 200000) // ~3.8 MiB, several chunks

func gz(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

func zst(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w, _ := zstd.NewWriter(&buf)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

func read(t *testing.T, blob []byte, d Descriptor) ([]byte, error) {
	t.Helper()
	r, err := NewReader(bytes.NewReader(blob), d)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

func TestFormats(t *testing.T) {
	for name, blob := range map[string][]byte{"gzip": gz(t, payload), "zstd": zst(t, payload), "plain": payload} {
		t.Run(name, func(t *testing.T) {
			got, err := read(t, blob, Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), DiffID: digest.FromBytes(payload)})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, payload) {
				t.Fatal("content differs")
			}
		})
	}
}

func TestVerification(t *testing.T) {
	blob := gz(t, payload)
	good := Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), DiffID: digest.FromBytes(payload)}
	half := blob[:len(blob)/2]
	junk := append([]byte{0x28, 0xb5, 0x2f, 0xfd}, bytes.Repeat([]byte{0xff}, 100)...)
	cases := map[string]struct {
		blob []byte
		desc Descriptor
		want string
	}{
		"blob digest":            {blob, Descriptor{MediaType: good.MediaType, Digest: digest.FromString("other"), DiffID: good.DiffID}, "blob digest"},
		"diffID":                 {blob, Descriptor{MediaType: good.MediaType, Digest: good.Digest, DiffID: digest.FromString("other")}, "diffID"},
		"verified, wrong diffID": {blob, Descriptor{MediaType: good.MediaType, Digest: digest.FromString("other"), DiffID: digest.FromString("other"), Verified: true}, "diffID"},
		// A blob that is what its digest says but does not decompress.
		"truncated":    {half, Descriptor{MediaType: good.MediaType, Digest: digest.FromBytes(half), DiffID: good.DiffID}, "truncated or corrupt"},
		"corrupt zstd": {junk, Descriptor{MediaType: good.MediaType, Digest: digest.FromBytes(junk), DiffID: good.DiffID}, "decompressing"},
		// One that is not: the mismatch is the cause, not what fails first.
		"truncated, other digest":    {half, good, "digest mismatch"},
		"corrupt zstd, other digest": {junk, good, "digest mismatch"},
		"media type":                 {blob, Descriptor{MediaType: "application/vnd.example.unknown", Digest: good.Digest, DiffID: good.DiffID}, "unknown layer media type"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := read(t, c.blob, c.desc)
			if err == nil {
				t.Fatal("no error")
			}
			var le *Error
			if !errors.As(err, &le) || le.Digest != c.desc.Digest {
				t.Errorf("%v: not a layer error naming the digest", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("%v: want %q", err, c.want)
			}
		})
	}
}

func TestFinishVerifiesUnreadTail(t *testing.T) {
	blob := gz(t, payload)
	r, err := NewReader(bytes.NewReader(blob), Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), DiffID: digest.FromString("wrong")})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, 100)
	if _, err := r.Read(buf); err != nil {
		t.Fatal(err)
	}
	if err := r.Finish(); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Finish = %v, want a digest mismatch", err)
	}
}

func TestCloseEarly(t *testing.T) {
	blob := gz(t, payload)
	r, err := NewReader(bytes.NewReader(blob), Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), DiffID: digest.FromBytes(payload)})
	if err != nil {
		t.Fatal(err)
	}
	r.Close() // must not hang or leak the decompressor
}

// TestCloseMidStream: closing a reader whose decompressor (igzip where
// installed) is still taking in the blob stops it without racing the
// reads that follow; the race detector checks.
func TestCloseMidStream(t *testing.T) {
	random := make([]byte, 8<<20)
	rand.New(rand.NewSource(1)).Read(random)
	blob := gz(t, random)
	for range 5 {
		r, err := NewReader(iotest.HalfReader(bytes.NewReader(blob)), Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), DiffID: digest.FromBytes(random)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r, make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		r.Close()
	}
}

// TestChunksReused: the decompressor's chunks go back to it once read,
// rather than a new one being allocated for each megabyte of the layer,
// which for a large layer made most of a build's garbage.
func TestChunksReused(t *testing.T) {
	const size = 64 << 20
	blob := gz(t, make([]byte, size))
	d := Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob)}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	r, err := NewReader(bytes.NewReader(blob), d)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, r)
	r.Close()
	runtime.ReadMemStats(&after)
	if err != nil || n != size {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/4 {
		t.Errorf("reading a %d MiB layer allocated %d MiB", size>>20, alloc>>20)
	}
}

// TestVerifiedBlob: a blob its source has checked is not hashed again;
// its digest only names it.
func TestVerifiedBlob(t *testing.T) {
	blob := gz(t, payload)
	other := digest.FromString("other")
	got, err := read(t, blob, Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: other, DiffID: digest.FromBytes(payload), Verified: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("content differs")
	}
}
