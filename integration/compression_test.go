package integration

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"math/rand"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/kilnfs/kiln/integration/testimage"
)

// TestConvertMagicNamedLayers: plain layer tars whose first entry's name
// starts with the gzip or the zstd magic are tars, as their media type
// says (OCI layout) or their first header shows (docker save archive).
func TestConvertMagicNamedLayers(t *testing.T) {
	entry := func(name, body string) tarEntry {
		// GNU headers hold the name's bytes as they are, first in the tar.
		e := tFile(name, 0o644, t1, body)
		e.hdr.Format = tar.FormatGNU
		return e
	}
	gzipNamed := layerTar(t, entry("\x1f\x8b\x08gzip-named", "gzip"))
	zstdNamed := layerTar(t, entry("\x28\xb5\x2f\xfdzstd-named", "zstd")) // 0x2f: a file in a directory
	gzipped := layerTar(t, entry("\x1f\x8b\x08in-gzip", "in gzip"))
	want := map[string]string{
		"/\x1f\x8b\x08gzip-named":  "gzip",
		"/\x28\xb5/\xfdzstd-named": "zstd",
		"/\x1f\x8b\x08in-gzip":     "in gzip",
	}

	dir := t.TempDir()
	layoutDir := filepath.Join(dir, "layout")
	img := rawImage(t,
		rawLayer{blob: gzipNamed, mediaType: types.OCIUncompressedLayer, diffID: sha(t, gzipNamed)},
		rawLayer{blob: zstdNamed, mediaType: types.OCIUncompressedLayer, diffID: sha(t, zstdNamed)},
		gzLayer(t, gzipped))
	if err := testimage.WriteLayout(layoutDir, "v1", img); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "image.tar")
	spec := testimage.Image{Layers: []testimage.Layer{{Tar: gzipNamed}, {Tar: zstdNamed}, {Tar: gzipped}}}
	if err := testimage.WriteDockerArchive(archive, "magic:v1", spec); err != nil {
		t.Fatal(err)
	}
	for _, src := range []string{"oci:" + layoutDir + ":v1", "docker-archive:" + archive} {
		t.Run(src[:3], func(t *testing.T) {
			out := filepath.Join(dir, src[:3]+".ext4")
			convert(t, src, out, filepath.Join(dir, "cache-"+src[:3]))
			fsck(t, out)
			im := inspect(t, out)
			for p, body := range want {
				sum := sha256.Sum256([]byte(body))
				if e := im.Entries[p]; e == nil || e.SHA256 != hex.EncodeToString(sum[:]) {
					t.Errorf("%q: %+v, want a file holding %q", p, e, body)
				}
			}
		})
	}
}

// TestConvertGzipDecompressors: kiln inflates gzip layers as containerd
// does, with igzip or unpigz where installed and Go's reader otherwise;
// both give the same image, from a layer of two gzip members too.
func TestConvertGzipDecompressors(t *testing.T) {
	var found []string
	for _, cmd := range []string{"igzip", "unpigz"} {
		if _, err := exec.LookPath(cmd); err == nil {
			found = append(found, cmd)
		}
	}
	if len(found) == 0 {
		t.Skip("neither igzip (Debian's isal) nor unpigz is installed: only Go's gzip reader would run")
	}
	random := make([]byte, 3<<20)
	rand.New(rand.NewSource(7)).Read(random)
	tb := layerTar(t, tFile("ok", 0o644, t1, "fine"), tFile("random", 0o644, t1, string(random)), tFile("text", 0o644, t1, strings.Repeat("kiln ", 200000)))
	half := len(tb) / 2
	twoMembers := append(gz(t, tb[:half]), gz(t, tb[half:])...)
	dir := t.TempDir()
	layoutDir := filepath.Join(dir, "layout")
	img := rawImage(t, rawLayer{blob: twoMembers, mediaType: types.OCILayer, diffID: sha(t, tb)})
	if err := testimage.WriteLayout(layoutDir, "v1", img); err != nil {
		t.Fatal(err)
	}
	src := "oci:" + layoutDir + ":v1"
	sums := map[string]string{}
	for name, env := range map[string]map[string]string{
		strings.Join(found, ", "): nil,
		"Go":                      {"CONTAINERD_DISABLE_IGZIP": "1", "CONTAINERD_DISABLE_PIGZ": "1"},
	} {
		out := filepath.Join(dir, strings.ReplaceAll(name, ", ", "-")+".ext4")
		res := kiln(t, run{args: convertArgs(src, out, filepath.Join(dir, "cache-"+name)), env: env})
		if res.err != nil {
			t.Fatalf("kiln convert with %s: %v\n%s", name, res.err, res.stderr)
		}
		sums[name] = fileSHA(t, out)
	}
	if len(sums) != 2 || sums["Go"] != sums[strings.Join(found, ", ")] {
		t.Errorf("the images differ by decompressor: %v", sums)
	}
}
