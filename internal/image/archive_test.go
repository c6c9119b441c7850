package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/layer"
)

// TestArchiveLayers: a docker archive's layer files have no media type;
// each is read as its first bytes say: plain (even when its first entry's
// name starts with the gzip magic), gzip or zstd, also behind a link.
func TestArchiveLayers(t *testing.T) {
	layerTar := func(name string) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: 1, Format: tar.FormatGNU})
		tw.Write([]byte("x"))
		tw.Close()
		return buf.Bytes()
	}
	var gz, zst bytes.Buffer
	gw := gzip.NewWriter(&gz)
	gw.Write(layerTar("gzip"))
	gw.Close()
	zw, _ := zstd.NewWriter(&zst)
	zw.Write(layerTar("zstd"))
	zw.Close()
	tars := [][]byte{layerTar("\x1f\x8b\x08plain"), layerTar("gzip"), layerTar("zstd")}
	files := [][]byte{tars[0], gz.Bytes(), zst.Bytes()}

	var diffIDs []digest.Digest
	for _, b := range tars {
		diffIDs = append(diffIDs, digest.FromBytes(b))
	}
	cfg, _ := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	manifest, _ := json.Marshal([]map[string]any{{
		"Config": "config.json", "RepoTags": []string{"a:v1"},
		"Layers": []string{"blobs/0", "blobs/1", "2/layer.tar"},
	}})
	var archive bytes.Buffer
	tw := tar.NewWriter(&archive)
	add := func(name string, data []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data))})
		tw.Write(data)
	}
	add("blobs/0", files[0])
	add("blobs/1", files[1])
	add("blobs/2", files[2])
	tw.WriteHeader(&tar.Header{Name: "2/layer.tar", Typeflag: tar.TypeSymlink, Linkname: "../blobs/2"})
	add("config.json", cfg)
	add("manifest.json", manifest)
	tw.Close()
	file := filepath.Join(t.TempDir(), "image.tar")
	if err := os.WriteFile(file, archive.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	img, err := fromArchive(file+":a:v1", ocispec.Platform{OS: "linux", Architecture: "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Layers) != 3 {
		t.Fatalf("%d layers", len(img.Layers))
	}
	for i, l := range img.Layers {
		blob, err := l.Open()
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		r, err := layer.NewReader(blob, l.Descriptor)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		blob.Close()
		if err != nil || !bytes.Equal(got, tars[i]) {
			t.Errorf("layer %d: %v, or not the tar written", i, err)
		}
	}
}
