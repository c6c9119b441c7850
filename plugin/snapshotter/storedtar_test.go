package snapshotter

import (
	"archive/tar"
	"bytes"
	"io"
	"testing"

	"github.com/kilnfs/kiln/internal/ext4read"
)

// TestRebuildFromMagicNamedTar: a stored layer tar (as earlier kilns
// kept every layer) whose first entry's name starts with the gzip or
// zstd magic is a plain tar (as its media type says), and a disk built
// from it holds that entry.
func TestRebuildFromMagicNamedTar(t *testing.T) {
	needE2fsprogs(t)
	for name, entry := range map[string]string{
		"gzip": "\x1f\x8b\x08file",
		"zstd": "\x28\xb5\x2f\xfdfile", // 0x2f is a slash: a file in a directory
	} {
		t.Run(name, func(t *testing.T) {
			sn, ctx := newCommittedBase(t, Config{})
			var buf bytes.Buffer
			tw := tar.NewWriter(&buf)
			// GNU headers hold the name's bytes as they are, first in
			// the tar.
			if err := tw.WriteHeader(&tar.Header{Name: entry, Typeflag: tar.TypeReg, Mode: 0o644, Size: 5, Format: tar.FormatGNU}); err != nil {
				t.Fatal(err)
			}
			tw.Write([]byte("data\n"))
			tw.Close()
			if !bytes.HasPrefix(buf.Bytes(), []byte(entry[:2])) {
				t.Fatalf("the tar starts with %x", buf.Bytes()[:4])
			}
			if _, err := writeOldLayerTar(ctx, sn, "extract-2 magic", "base", buf.Bytes()); err != nil {
				t.Fatal(err)
			}
			if err := sn.Commit(ctx, "magic", "extract-2 magic"); err != nil {
				t.Fatal(err)
			}
			view, err := sn.View(ctx, "v", "magic")
			if err != nil {
				t.Fatalf("building from the stored tar: %v", err)
			}
			fs, c, err := ext4read.OpenFile(view[0].Source, ext4read.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ino, err := fs.Lookup("/" + entry)
			if err != nil {
				t.Fatal(err)
			}
			f, err := fs.Open(ino)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := io.ReadAll(f); err != nil || string(got) != "data\n" {
				t.Errorf("%q holds %q: %v", entry, got, err)
			}
		})
	}
}
