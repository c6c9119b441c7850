package integration

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/kilnfs/kiln/integration/testimage"
)

// evilName is the name every hostile entry tries to create; it is unique
// to this test process so that nothing else can be mistaken for it.
var evilName = fmt.Sprintf("kiln-evil-%d", os.Getpid())

// rawLayer is a layer blob exactly as given.
type rawLayer struct {
	blob      []byte
	mediaType types.MediaType
	diffID    v1.Hash // what the config says the blob decompresses to
}

func gz(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zst(t *testing.T, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func sha(t *testing.T, data []byte) v1.Hash {
	t.Helper()
	h, _, err := v1.SHA256(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// gzLayer is a well-formed gzip layer of tarBytes.
func gzLayer(t *testing.T, tarBytes []byte) rawLayer {
	return rawLayer{blob: gz(t, tarBytes), mediaType: types.OCILayer, diffID: sha(t, tarBytes)}
}

// rawImage assembles an image whose manifest lists the blobs as given and
// whose config lists the given diffIDs, right or wrong.
func rawImage(t *testing.T, layers ...rawLayer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var diffIDs []v1.Hash
	for _, l := range layers {
		var err error
		img, err = mutate.Append(img, mutate.Addendum{Layer: static.NewLayer(l.blob, l.mediaType), MediaType: l.mediaType})
		if err != nil {
			t.Fatal(err)
		}
		diffIDs = append(diffIDs, l.diffID)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.RootFS.DiffIDs = diffIDs
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// badCase is one hostile or broken image.
type badCase struct {
	name string
	img  func(t *testing.T) v1.Image
	// layer is the index of the layer the error is about, -1 for none.
	layer int
	// entry is the tar entry name the error must quote, if any.
	entry string
	// mention lists more text the error must hold; anyOf, if set,
	// needs one of its strings.
	mention []string
	anyOf   []string
	// sources: "layout", "registry" (both if empty).
	sources []string
	// tamper changes the stored image after it was written: the layout
	// directory, or the registry (dir is then empty).
	tamper func(t *testing.T, img v1.Image, dir string)
	// src builds the source itself (for indexes); img is then unused.
	src  func(t *testing.T, dir string) string
	args []string
}

func badCases(t *testing.T) []badCase {
	okFile := tFile("ok", 0o644, t1, "fine")
	evil := func(name string) badCase {
		return badCase{
			layer: 0, entry: name,
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, okFile, tFile(name, 0o644, t1, "pwned"))))
			},
		}
	}
	traversal := evil("../" + evilName)
	traversal.name, traversal.mention = "path traversal", []string{"unsafe path"}
	absolute := evil("/etc/" + evilName)
	absolute.name, absolute.mention = "absolute path", []string{"unsafe path"}

	escape := strings.Repeat("../", 30) + "tmp"
	return []badCase{
		traversal,
		absolute,
		{
			name: "entry below a symlink that leads out", layer: 1, entry: "link/" + evilName,
			img: func(t *testing.T) v1.Image {
				return rawImage(t,
					gzLayer(t, layerTar(t, okFile, tSymlink("link", escape, t1))),
					gzLayer(t, layerTar(t, tFile("link/"+evilName, 0o644, t1, "pwned"))))
			},
			mention: []string{"unsafe path"},
		},
		{
			name: "hard link to outside", layer: 0, entry: evilName,
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, okFile, tHardlink(evilName, "../../x", t1))))
			},
			mention: []string{"../../x"},
		},
		{
			name: "hard link through a symlink that leads out", layer: 0, entry: evilName,
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, okFile, tSymlink("up", escape, t1),
					tHardlink(evilName, "up/etc/passwd", t1))))
			},
			mention: []string{"up/etc/passwd"},
		},
		{
			name: "blob digest mismatch", layer: 0, sources: []string{"layout"},
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, okFile)))
			},
			// The blob is replaced by another well-formed layer.
			tamper: func(t *testing.T, img v1.Image, dir string) {
				replaceBlob(t, img, dir, gz(t, layerTar(t, tFile("ok", 0o644, t1, "replaced"))))
			},
			mention: []string{"digest mismatch"},
		},
		{
			name: "blob digest mismatch with hostile content", layer: 0, sources: []string{"layout"},
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, okFile)))
			},
			// The replacement tries to write outside, before kiln can
			// know that the blob is not the one the manifest names:
			// either reason may be given, and nothing may land.
			tamper: func(t *testing.T, img v1.Image, dir string) {
				replaceBlob(t, img, dir, gz(t, layerTar(t, tFile("../"+evilName, 0o644, t1, "pwned"), tFile(evilName, 0o644, t1, "x"))))
			},
		},
		{
			name: "registry serves other bytes of the same size", layer: 0, sources: []string{"registry"},
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, tFile("ok", 0o644, t1, "served wrong"))))
			},
			tamper: func(t *testing.T, img v1.Image, _ string) {
				l, err := img.LayerByDigest(mustHash(t, layerDigests(t, img)[0]))
				if err != nil {
					t.Fatal(err)
				}
				rc, err := l.Compressed()
				if err != nil {
					t.Fatal(err)
				}
				defer rc.Close()
				var buf bytes.Buffer
				if _, err := buf.ReadFrom(rc); err != nil {
					t.Fatal(err)
				}
				b := buf.Bytes()
				b[len(b)/2] ^= 0xff
				reg.ServeBlob(layerDigests(t, img)[0], b)
			},
			// kiln decodes a layer while it downloads it, and the
			// garbled stream may fail first; the mismatch is the cause.
			mention: []string{"digest mismatch"},
		},
		{
			// A well-formed tar, so that only the digest can tell.
			name: "registry serves another layer of the same size", layer: 0, sources: []string{"registry"},
			img: func(t *testing.T) v1.Image {
				tarBytes := layerTar(t, tFile("ok", 0o644, t1, "served right"))
				return rawImage(t, rawLayer{blob: tarBytes, mediaType: types.OCIUncompressedLayer, diffID: sha(t, tarBytes)})
			},
			tamper: func(t *testing.T, img v1.Image, _ string) {
				other := layerTar(t, tFile("ok", 0o644, t1, "served wrong"))
				reg.ServeBlob(layerDigests(t, img)[0], other)
			},
			mention: []string{"digest mismatch"},
		},
		{
			name: "registry serves a blob of another size", layer: 0, sources: []string{"registry"},
			img: func(t *testing.T) v1.Image {
				return rawImage(t, gzLayer(t, layerTar(t, tFile("ok", 0o644, t1, "served short"))))
			},
			tamper: func(t *testing.T, img v1.Image, _ string) {
				reg.ServeBlob(layerDigests(t, img)[0], gz(t, layerTar(t, tFile(evilName, 0o644, t1, "pwned"))))
			},
		},
		{
			name: "diffID mismatch", layer: 0,
			img: func(t *testing.T) v1.Image {
				l := gzLayer(t, layerTar(t, okFile))
				l.diffID = sha(t, []byte("not this layer"))
				return rawImage(t, l)
			},
			mention: []string{"diffID"},
		},
		{
			name: "truncated gzip layer", layer: 0,
			img: func(t *testing.T) v1.Image {
				tb := layerTar(t, okFile, tFile("big", 0o644, t1, strings.Repeat("incompressible? no, but long enough ", 2000)))
				blob := gz(t, tb)
				return rawImage(t, rawLayer{blob: blob[:len(blob)/2], mediaType: types.OCILayer, diffID: sha(t, tb)})
			},
			anyOf: []string{"truncated", "unexpected EOF", "unexpected end"},
		},
		{
			name: "corrupt zstd layer", layer: 0,
			img: func(t *testing.T) v1.Image {
				tb := layerTar(t, okFile)
				blob := zst(t, tb)
				for i := 4; i < len(blob); i++ {
					blob[i] ^= 0x5a // keep the magic, garble the frame
				}
				return rawImage(t, rawLayer{blob: blob, mediaType: types.OCILayerZStd, diffID: sha(t, tb)})
			},
			anyOf: []string{"zstd", "corrupt", "decompress"},
		},
		{
			name: "unknown layer media type", layer: 0,
			img: func(t *testing.T) v1.Image {
				l := gzLayer(t, layerTar(t, okFile))
				l.mediaType = "application/vnd.example.unknown"
				return rawImage(t, l)
			},
			mention: []string{"application/vnd.example.unknown"},
		},
		{
			name: "zstd bomb past the layer_bytes limit", layer: 0, entry: "bomb",
			img: func(t *testing.T) v1.Image {
				tb := layerTar(t, okFile, tFile("bomb", 0o644, t1, strings.Repeat("\x00", 96<<20)))
				return rawImage(t, rawLayer{blob: zst(t, tb), mediaType: types.OCILayerZStd, diffID: sha(t, tb)})
			},
			args:    []string{"--limit", "layer_bytes=32M"},
			mention: []string{"over the layer_bytes limit of 32 MiB"},
		},
		{
			name: "entry flood past the entries limit", layer: 0, entry: "f0999",
			img: func(t *testing.T) v1.Image {
				entries := []tarEntry{okFile}
				for i := 0; i < 1200; i++ {
					entries = append(entries, tFile(fmt.Sprintf("f%04d", i), 0o644, t1, ""))
				}
				return rawImage(t, gzLayer(t, layerTar(t, entries...)))
			},
			args:    []string{"--limit", "entries=1000"},
			mention: []string{"over the entries limit of 1000"},
		},
		{
			name: "missing platform", layer: -1,
			src: func(t *testing.T, dir string) string {
				arm := platformImage(t, "arm64")
				if dir == "" {
					ref := reg.Host + "/bad-platform:v1"
					if err := testimage.PushIndex(ref, map[string]v1.Image{"linux/arm64": arm}); err != nil {
						t.Fatal(err)
					}
					return ref
				}
				if err := testimage.WriteIndexLayout(dir, "v1", map[string]v1.Image{"linux/arm64": arm}); err != nil {
					t.Fatal(err)
				}
				return "oci:" + dir + ":v1"
			},
			args:    []string{"--platform", "linux/riscv64"},
			mention: []string{"linux/riscv64", "linux/arm64"},
		},
		{
			name: "empty index", layer: -1, sources: []string{"layout"},
			src: func(t *testing.T, dir string) string {
				p, err := layout.Write(dir, empty.Index)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
					t.Fatal(err)
				}
				idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
				if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
					t.Fatal(err)
				}
				return "oci:" + dir + ":v1"
			},
			mention: []string{"empty"},
		},
	}
}

// TestBadInput: every broken or hostile image fails with an error that
// names the image, the layer and the entry; writes nothing outside the
// output path and the cache; and leaves no output file.
func TestBadInput(t *testing.T) {
	for i, c := range badCases(t) {
		sources := c.sources
		if len(sources) == 0 {
			sources = []string{"layout", "registry"}
		}
		for _, via := range sources {
			t.Run(c.name+"/"+via, func(t *testing.T) {
				sentinel := t.TempDir()
				dirs := map[string]string{}
				for _, d := range []string{"work", "home", "out", "cache", "image"} {
					dirs[d] = filepath.Join(sentinel, d)
					if err := os.Mkdir(dirs[d], 0o755); err != nil {
						t.Fatal(err)
					}
				}
				var src string
				var img v1.Image
				switch {
				case c.src != nil && via == "layout":
					src = c.src(t, filepath.Join(dirs["image"], "layout"))
				case c.src != nil:
					src = c.src(t, "")
				case via == "layout":
					img = c.img(t)
					dir := filepath.Join(dirs["image"], "layout")
					if err := testimage.WriteLayout(dir, "bad", img); err != nil {
						t.Fatal(err)
					}
					if c.tamper != nil {
						c.tamper(t, img, dir)
					}
					src = "oci:" + dir + ":bad"
				default:
					img = c.img(t)
					src = mustPush(t, fmt.Sprintf("bad%d:v1", i), img)
					if c.tamper != nil {
						c.tamper(t, img, "")
					}
				}

				out := filepath.Join(dirs["out"], "rootfs.ext4")
				res := kiln(t, run{
					args: convertArgs(src, out, dirs["cache"], c.args...),
					env:  map[string]string{"HOME": dirs["home"]},
					dir:  dirs["work"],
				})
				if res.err == nil {
					t.Fatalf("kiln convert %s succeeded", src)
				}
				msg := strings.TrimSpace(res.stderr)
				t.Logf("error output: %s", msg)

				want := c.mention
				if c.layer >= 0 {
					want = append(want, layerDigests(t, img)[c.layer])
				}
				if c.entry != "" {
					want = append(want, fmt.Sprintf("%q", c.entry))
				}
				assertError(t, msg, src, want...)
				if len(c.anyOf) > 0 && !containsAny(strings.ReplaceAll(msg, src, "<image>"), c.anyOf) {
					t.Errorf("the error says none of %q", c.anyOf)
				}

				assertNotExist(t, out)
				if ents, _ := os.ReadDir(dirs["out"]); len(ents) > 0 {
					t.Errorf("the output directory holds %d files after a failure", len(ents))
				}
				for _, d := range []string{"work", "home"} {
					if found := findName(dirs[d], ""); len(found) > 0 {
						t.Errorf("kiln wrote into its %s directory: %q", d, found)
					}
				}
				for _, sub := range []string{"rootfs", "tmp"} {
					if ents, _ := os.ReadDir(filepath.Join(dirs["cache"], sub)); len(ents) > 0 {
						t.Errorf("cache %s/ holds %d entries after a failure", sub, len(ents))
					}
				}
				for _, root := range []string{sentinel, os.TempDir(), "/tmp"} {
					if found := findName(root, evilName); len(found) > 0 {
						t.Errorf("%s written: %q", evilName, found)
					}
				}
			})
		}
	}
}

// replaceBlob overwrites the first layer blob of img in the layout at dir.
func replaceBlob(t *testing.T, img v1.Image, dir string, data []byte) {
	t.Helper()
	d := layerDigests(t, img)[0]
	blob := filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(d, "sha256:"))
	if err := os.WriteFile(blob, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustHash(t *testing.T, s string) v1.Hash {
	t.Helper()
	h, err := v1.NewHash(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// findName lists the paths under root (root itself excluded) whose last
// element is name, or all of them if name is empty.
func findName(root, name string) []string {
	var found []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error { //nolint:errcheck // unreadable parts are skipped
		if err != nil {
			if d != nil && d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if p != root && (name == "" || d.Name() == name) {
			found = append(found, p)
		}
		return nil
	})
	return found
}
