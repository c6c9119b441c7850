package layer

import (
	"archive/tar"
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// magicTar is a plain tar whose first entry's name starts with magic, so
// that its first bytes are those of a compressed stream (as GNU tar
// writes such a name: archive/tar only writes ASCII names in a header).
func magicTar(t *testing.T, magic string, format tar.Format) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := []byte("data\n")
	name := strings.Repeat("x", len(magic)) + "file"
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), Format: format}); err != nil {
		t.Fatal(err)
	}
	tw.Write(body)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return patchHeader(buf.Bytes(), func(h []byte) { copy(h, magic) })
}

// oldStyle turns a tar's first header into a pre-POSIX one: no ustar
// magic.
func oldStyle(b []byte) []byte {
	return patchHeader(b, func(h []byte) { clear(h[257:265]) })
}

// patchHeader changes a copy of a tar's first header and sets its
// checksum again.
func patchHeader(b []byte, change func([]byte)) []byte {
	b = bytes.Clone(b)
	change(b[:512])
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b[:512] {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

var (
	gzipMagic = "\x1f\x8b\x08"
	zstdMagic = "\x28\xb5\x2f\xfd"
)

// TestMagicNamedTars: a plain tar whose first bytes are a compressor's
// magic is read as a tar, whether its media type says so or the data
// has to decide; compressed blobs stay compressed.
func TestMagicNamedTars(t *testing.T) {
	for name, tarball := range map[string][]byte{
		"gzip magic, ustar":     magicTar(t, gzipMagic, tar.FormatUSTAR),
		"gzip magic, gnu":       magicTar(t, gzipMagic, tar.FormatGNU),
		"zstd magic, pax":       magicTar(t, zstdMagic, tar.FormatPAX),
		"zstd magic, old-style": oldStyle(magicTar(t, zstdMagic, tar.FormatUSTAR)),
		"gzip magic, old-style": oldStyle(magicTar(t, gzipMagic, tar.FormatUSTAR)),
	} {
		t.Run(name, func(t *testing.T) {
			for _, mt := range []string{"", ocispec.MediaTypeImageLayer, MediaTypeDockerLayerPlain, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd} {
				if c := DetectCompression(mt, tarball); c != Plain {
					t.Errorf("%s: detected %v", mt, c)
				}
			}
			got, err := read(t, tarball, Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(tarball), DiffID: digest.FromBytes(tarball)})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tarball) {
				t.Fatal("content differs")
			}
			hdr, err := tar.NewReader(bytes.NewReader(got)).Next()
			if err != nil || hdr.Name[len(hdr.Name)-4:] != "file" {
				t.Fatalf("not the tar written: %v", err)
			}
			// Compressed, it is decompressed as before.
			gzBlob := gz(t, tarball)
			got, err = read(t, gzBlob, Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(gzBlob), DiffID: digest.FromBytes(tarball)})
			if err != nil || !bytes.Equal(got, tarball) {
				t.Fatalf("gzip-compressed: %v", err)
			}
		})
	}
}

func TestDetectCompression(t *testing.T) {
	tarball := magicTar(t, "", tar.FormatPAX)
	gzBlob, zstBlob := gz(t, tarball), zst(t, tarball)
	head := func(b []byte) []byte { return b[:min(len(b), HeadSize)] }
	for _, c := range []struct {
		mediaType string
		blob      []byte
		want      Compression
	}{
		{ocispec.MediaTypeImageLayerGzip, gzBlob, Gzip},
		{MediaTypeDockerLayer, gzBlob, Gzip},
		{ocispec.MediaTypeImageLayerZstd, zstBlob, Zstd},
		{ocispec.MediaTypeImageLayer, tarball, Plain},
		// The media type says tar: the data is never second-guessed.
		{ocispec.MediaTypeImageLayer, gzBlob, Plain},
		// Labels the data cannot match: the data decides.
		{ocispec.MediaTypeImageLayerGzip, tarball, Plain},
		{MediaTypeDockerLayer, tarball, Plain},
		{ocispec.MediaTypeImageLayerGzip, zstBlob, Zstd},
		{ocispec.MediaTypeImageLayerZstd, gzBlob, Gzip},
		{"", gzBlob, Gzip},
		{"", zstBlob, Zstd},
		{"", tarball, Plain},
		{"", nil, Plain},
		// A block that looks like a header but whose checksum is wrong
		// is not one.
		{"", append([]byte(gzipMagic), make([]byte, 600)...), Gzip},
	} {
		if got := DetectCompression(c.mediaType, head(c.blob)); got != c.want {
			t.Errorf("%q, blob starting %x: %v, want %v", c.mediaType, head(c.blob)[:min(4, len(c.blob))], got, c.want)
		}
	}
	// Every compressed layer in a gzip or zstd blob, however short, reads.
	for _, blob := range [][]byte{gz(t, nil), zst(t, nil)} {
		if _, err := read(t, blob, Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip}); err != nil {
			t.Errorf("empty compressed blob: %v", err)
		}
	}
}
