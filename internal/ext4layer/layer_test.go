package ext4layer_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/ext4layer"
	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// entry is a tar entry as the tests check it.
type entry struct {
	hdr     *tar.Header
	content []byte
}

func readTar(t *testing.T, b []byte) []entry {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(b))
	var ents []entry
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return ents
		}
		must(t, err)
		content, err := io.ReadAll(tr)
		must(t, err)
		ents = append(ents, entry{hdr, content})
	}
}

// describe sums up an entry in one line: name, type and what matters for
// the type.
func describe(e entry) string {
	h := e.hdr
	var xattrs []string
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			xattrs = append(xattrs, fmt.Sprintf("%s=%q", name, v))
		}
	}
	sort.Strings(xattrs)
	s := fmt.Sprintf("%s %c %o %d:%d", h.Name, h.Typeflag, h.Mode, h.Uid, h.Gid)
	switch h.Typeflag {
	case tar.TypeReg:
		s += fmt.Sprintf(" size=%d", h.Size)
	case tar.TypeLink, tar.TypeSymlink:
		s += " -> " + h.Linkname
	case tar.TypeChar, tar.TypeBlock:
		s += fmt.Sprintf(" dev=%d:%d", h.Devmajor, h.Devminor)
	}
	if len(xattrs) > 0 {
		s += " " + strings.Join(xattrs, " ")
	}
	return s
}

func names(ents []entry) []string {
	var s []string
	for _, e := range ents {
		s = append(s, describe(e))
	}
	return s
}

func checkEntries(t *testing.T, got []entry, want []string) {
	t.Helper()
	g := names(got)
	if strings.Join(g, "\n") != strings.Join(want, "\n") {
		t.Errorf("entries:\n%s\nwant:\n%s", strings.Join(g, "\n"), strings.Join(want, "\n"))
	}
	for _, e := range got {
		h := e.hdr
		if !h.AccessTime.IsZero() || !h.ChangeTime.IsZero() || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: carries atime, ctime or names: %+v", h.Name, h)
		}
		if _, ok := h.PAXRecords["atime"]; ok {
			t.Errorf("%s: has an atime record", h.Name)
		}
	}
}

func byName(ents []entry) map[string]entry {
	m := map[string]entry{}
	for _, e := range ents {
		m[e.hdr.Name] = e
	}
	return m
}

var capability = []byte{1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// fullImage is the tree the Full and Changes tests start from.
func fullImage(t *testing.T) (img string, stage string) {
	stage = t.TempDir()
	p := func(name string) string { return filepath.Join(stage, name) }
	ext4test.WriteFile(t, p("a/file"), []byte("content\n"), 0o4755)
	must(t, os.Link(p("a/file"), p("a/link")))
	must(t, os.Mkdir(p("b"), 0o755))
	must(t, os.Link(p("a/file"), p("b/link2")))
	ext4test.WriteFile(t, p("a/big"), ext4test.Pattern(3<<20+5, 1), 0o644)
	ext4test.WriteFile(t, p("empty"), nil, 0o600)
	sparse, err := os.Create(p("sparse"))
	must(t, err)
	_, err = sparse.WriteAt([]byte("tail"), 5<<20)
	must(t, err)
	sparse.Close()
	must(t, os.Symlink("../a/file", p("b/sym")))
	must(t, unix.Mkfifo(p("b/fifo"), 0o640))
	l, err := net.Listen("unix", p("b/sock"))
	must(t, err)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	must(t, os.Mkdir(p("tmp"), 0o755))
	must(t, unix.Chmod(p("tmp"), 0o1777))
	must(t, unix.Chmod(p("a"), 0o750))
	img = ext4test.Mkfs(t, stage, "32M")
	ext4test.Debugfs(t, img,
		"sif /a/file uid 70000", "sif /a/file gid 80000",
		"sif /a uid 1000",
		// 2040-01-02 03:04:05.123456789 UTC
		"sif /a/file mtime 0x83abfb25", fmt.Sprintf("sif /a/file mtime_extra %#x", 123456789<<2|1),
		"cd /b", "mknod chr c 4 64", "mknod blk b 259 1", "cd /",
		"sif /b/chr mode 020620", "sif /b/blk mode 060660",
		// 259:1048575 in the new encoding, which debugfs' mknod cannot write.
		"sif /b/blk block[0] 0", "sif /b/blk block[1] 0xfff103ff")
	ext4test.SetXattrs(t, img, "/a/file", map[string][]byte{"user.x": []byte("1"), "security.capability": capability})
	ext4test.SetXattrs(t, img, "/b", map[string][]byte{"trusted.overlay.opaque": []byte("y")})
	return img, stage
}

var fullWant = []string{
	"./ 5 755 0:0",
	"a/ 5 750 1000:0",
	"a/big 0 644 0:0 size=3145733",
	"a/file 0 4755 70000:80000 size=8 security.capability=\"\\x01\\x00\\x00\\x02 \\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\" user.x=\"1\"",
	"a/link 1 4755 70000:80000 -> a/file security.capability=\"\\x01\\x00\\x00\\x02 \\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\" user.x=\"1\"",
	"b/ 5 755 0:0 trusted.overlay.opaque=\"y\"",
	"b/blk 4 660 0:0 dev=259:1048575",
	"b/chr 3 620 0:0 dev=4:64",
	"b/fifo 6 640 0:0",
	"b/link2 1 4755 70000:80000 -> a/file security.capability=\"\\x01\\x00\\x00\\x02 \\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\" user.x=\"1\"",
	"b/sym 2 777 0:0 -> ../a/file",
	"empty 0 600 0:0 size=0",
	"lost+found/ 5 700 0:0",
	"sparse 0 644 0:0 size=5242884",
	"tmp/ 5 1777 0:0",
}

func TestFull(t *testing.T) {
	ext4test.Require(t)
	img, stage := fullImage(t)
	fsys := ext4test.Open(t, img)
	var out bytes.Buffer
	must(t, ext4layer.Full(context.Background(), &out, fsys, fsys.Root(), ext4layer.Options{}))
	ents := readTar(t, out.Bytes())
	checkEntries(t, ents, fullWant)

	m := byName(ents)
	for _, name := range []string{"a/big", "a/file", "sparse"} {
		want, err := os.ReadFile(filepath.Join(stage, name))
		must(t, err)
		if !bytes.Equal(m[name].content, want) {
			t.Errorf("%s: content differs", name)
		}
	}
	if got, want := m["a/file"].hdr.ModTime, time.Date(2040, 1, 2, 3, 4, 5, 123456789, time.UTC); !got.Equal(want) {
		t.Errorf("a/file: mtime %v, want %v", got, want)
	}
	for _, e := range ents {
		if e.hdr.Format != tar.FormatPAX {
			// The reader reports the format it parsed; headers without
			// PAX records read back as USTAR, which PAX extends.
			if e.hdr.Format != tar.FormatUSTAR {
				t.Errorf("%s: format %v", e.hdr.Name, e.hdr.Format)
			}
		}
		if e.hdr.Typeflag == tar.TypeDir {
			continue
		}
		ino, err := fsys.Lookup(strings.TrimSuffix(e.hdr.Name, "/"))
		must(t, err)
		in, err := fsys.Inode(ino)
		must(t, err)
		if !e.hdr.ModTime.Equal(in.Mtime) {
			t.Errorf("%s: mtime %v, inode has %v", e.hdr.Name, e.hdr.ModTime, in.Mtime)
		}
	}

	// The same bytes again; times clamped with a source date epoch.
	var again bytes.Buffer
	must(t, ext4layer.Full(context.Background(), &again, fsys, fsys.Root(), ext4layer.Options{}))
	if !bytes.Equal(out.Bytes(), again.Bytes()) {
		t.Errorf("a second run wrote different bytes")
	}
	epoch := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	var clamped bytes.Buffer
	must(t, ext4layer.Full(context.Background(), &clamped, fsys, fsys.Root(), ext4layer.Options{SourceDateEpoch: &epoch}))
	for _, e := range readTar(t, clamped.Bytes()) {
		orig := m[e.hdr.Name].hdr.ModTime
		want := orig
		if orig.After(epoch) {
			want = epoch
		}
		if !e.hdr.ModTime.Equal(want) {
			t.Errorf("%s: clamped mtime %v, want %v", e.hdr.Name, e.hdr.ModTime, want)
		}
	}
	if !byName(readTar(t, clamped.Bytes()))["a/file"].hdr.ModTime.Equal(epoch) {
		t.Errorf("a/file was not clamped")
	}

	// A subtree as the root.
	ino, err := fsys.Lookup("/a")
	must(t, err)
	var sub bytes.Buffer
	must(t, ext4layer.Full(context.Background(), &sub, fsys, ino, ext4layer.Options{}))
	if got := names(readTar(t, sub.Bytes())); len(got) != 4 || got[0] != "./ 5 750 1000:0" || !strings.HasPrefix(got[3], "link 1 4755 70000:80000 -> file ") {
		t.Errorf("subtree: %q", got)
	}
}

// TestChangesFromNothing: with no lower tree, Changes writes what Full
// does.
func TestChangesFromNothing(t *testing.T) {
	ext4test.Require(t)
	img, _ := fullImage(t)
	fsys := ext4test.Open(t, img)
	var full, changes bytes.Buffer
	must(t, ext4layer.Full(context.Background(), &full, fsys, fsys.Root(), ext4layer.Options{}))
	must(t, ext4layer.Changes(context.Background(), &changes, nil, fsys, ext4layer.Options{}))
	if !bytes.Equal(full.Bytes(), changes.Bytes()) {
		t.Errorf("Changes from nothing differs from Full")
	}
}

func TestChanges(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	p := func(name string) string { return filepath.Join(stage, name) }
	for _, name := range []string{"gone", "keep/changed", "keep/del", "keep/own", "keep/unchanged", "keep2/x",
		"olddir/sub/deep", "olddir/f", "dir2file/child", "file2dir", "same/inplace", "same/untouched"} {
		ext4test.WriteFile(t, p(name), []byte("data of "+name), 0o644)
	}
	lowerImg := ext4test.Mkfs(t, stage, "16M")
	local := filepath.Join(t.TempDir(), "new")
	must(t, os.WriteFile(local, []byte("new content"), 0o644))
	upperImg := ext4test.Copy(t, lowerImg)
	ext4test.Debugfs(t, upperImg,
		"sif / mode 040700",
		"rm /gone",
		"write "+local+" added",
		"sif /keep/changed mode 0100600",
		"rm /keep/del",
		"sif /keep/own uid 5000",
		"link /keep/unchanged /keep/hl",
		"sif /keep/unchanged links_count 2",
		"symlink /newlink /some/target",
		"unlink /olddir",
		"unlink /dir2file",
		"write "+local+" dir2file",
		"rm /file2dir",
		"mkdir /file2dir",
		"write "+local+" file2dir/child",
		// Same size, same mtime, new bytes in the same block.
		"zap_block -f /same/inplace -o 0 -l 4 -p 0x41 0",
	)
	ext4test.SetXattrs(t, upperImg, "/keep2/x", map[string][]byte{"user.new": []byte("v")})
	lower, upper := ext4test.Open(t, lowerImg), ext4test.Open(t, upperImg)

	want := []string{
		"./ 5 700 0:0",
		"added 0 644 0:0 size=11",
		".wh.dir2file 0 0 0:0 size=0",
		"dir2file 0 644 0:0 size=11",
		"file2dir/ 5 755 0:0",
		"file2dir/child 0 644 0:0 size=11",
		".wh.gone 0 0 0:0 size=0",
		"keep/ 5 755 0:0",
		"keep/changed 0 600 0:0 size=20",
		"keep/.wh.del 0 0 0:0 size=0",
		"keep/hl 0 644 0:0 size=22",
		"keep/own 0 644 5000:0 size=16",
		"keep/unchanged 1 644 0:0 -> keep/hl",
		"keep2/ 5 755 0:0",
		"keep2/x 0 644 0:0 size=15 user.new=\"v\"",
		"newlink 2 777 0:0 -> /some/target",
		".wh.olddir 0 0 0:0 size=0",
		"same/ 5 755 0:0",
		"same/inplace 0 644 0:0 size=20",
	}
	var out bytes.Buffer
	must(t, ext4layer.Changes(context.Background(), &out, lower, upper, ext4layer.Options{}))
	ents := readTar(t, out.Bytes())
	checkEntries(t, ents, want)
	m := byName(ents)
	if got := string(m["same/inplace"].content); got != "AAAA of same/inplace" {
		t.Errorf("same/inplace: %q", got)
	}
	if got := string(m["keep/hl"].content); got != "data of keep/unchanged" {
		t.Errorf("keep/hl: %q", got)
	}
	if wh := m[".wh.gone"].hdr; !wh.ModTime.Equal(time.Unix(0, 0)) || wh.Size != 0 {
		t.Errorf("whiteout header: %+v", wh)
	}
	// The parent written for a changed child carries upper's metadata.
	keep, err := upper.Inode(mustLookup(t, upper, "/keep"))
	must(t, err)
	if got := m["keep/"].hdr.ModTime; !got.Equal(keep.Mtime) {
		t.Errorf("keep/: mtime %v, upper has %v", got, keep.Mtime)
	}

	// Trusting shared blocks misses the rewrite in place, as documented.
	out.Reset()
	must(t, ext4layer.Changes(context.Background(), &out, lower, upper, ext4layer.Options{SharedBlocks: true}))
	checkEntries(t, readTar(t, out.Bytes()), want[:len(want)-2])

	// No changes, no entries.
	out.Reset()
	must(t, ext4layer.Changes(context.Background(), &out, lower, lower, ext4layer.Options{}))
	if ents := readTar(t, out.Bytes()); len(ents) != 0 {
		t.Errorf("a tree against itself: %q", names(ents))
	}
}

func mustLookup(t *testing.T, fsys *ext4read.FS, p string) uint32 {
	t.Helper()
	ino, err := fsys.Lookup(p)
	must(t, err)
	return ino
}

func TestOverlayUpper(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	p := func(name string) string { return filepath.Join(stage, name) }
	ext4test.WriteFile(t, p("upper/opq/new"), []byte("new"), 0o644)
	ext4test.WriteFile(t, p("upper/f"), []byte("f"), 0o644)
	ext4test.WriteFile(t, p("upper/esc"), nil, 0o644)
	ext4test.WriteFile(t, p("upper/uopq/x"), nil, 0o644)
	ext4test.WriteFile(t, p("upper/plain/x"), nil, 0o644)
	ext4test.WriteFile(t, p("work/ignored"), nil, 0o644)
	l, err := net.Listen("unix", p("upper/sock"))
	must(t, err)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	img := ext4test.Mkfs(t, stage, "16M")
	ext4test.Debugfs(t, img,
		"cd /upper", "mknod gone c 0 0", "cd opq", "mknod gone2 c 0 0", "cd /",
		"link /upper/gone /upper/plain/gone3") // overlayfs links whiteouts to one inode
	ext4test.SetXattrs(t, img, "/upper/opq", map[string][]byte{"trusted.overlay.opaque": []byte("y")})
	ext4test.SetXattrs(t, img, "/upper/uopq", map[string][]byte{"user.overlay.opaque": []byte("y")})
	ext4test.SetXattrs(t, img, "/upper/plain", map[string][]byte{"trusted.overlay.opaque": []byte("x"), "trusted.overlay.impure": []byte("y")})
	ext4test.SetXattrs(t, img, "/upper/f", map[string][]byte{"trusted.overlay.origin": {0, 1}, "user.keep": []byte("k"), "security.capability": capability})
	ext4test.SetXattrs(t, img, "/upper/esc", map[string][]byte{"trusted.overlay.overlay.foo": []byte("bar")})
	fsys := ext4test.Open(t, img)

	var out bytes.Buffer
	must(t, ext4layer.OverlayUpper(context.Background(), &out, fsys, "/upper", ext4layer.Options{}))
	want := []string{
		"./ 5 755 0:0",
		"esc 0 644 0:0 size=0 trusted.overlay.foo=\"bar\"",
		"f 0 644 0:0 size=1 security.capability=\"\\x01\\x00\\x00\\x02 \\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\" user.keep=\"k\"",
		".wh.gone 0 0 0:0 size=0",
		"opq/ 5 755 0:0",
		"opq/.wh..wh..opq 0 0 0:0 size=0",
		"opq/.wh.gone2 0 0 0:0 size=0",
		"opq/new 0 644 0:0 size=3",
		"plain/ 5 755 0:0",
		"plain/.wh.gone3 0 0 0:0 size=0",
		"plain/x 0 644 0:0 size=0",
		".wh.sock 0 0 0:0 size=0",
		"uopq/ 5 755 0:0",
		"uopq/.wh..wh..opq 0 0 0:0 size=0",
		"uopq/x 0 644 0:0 size=0",
	}
	checkEntries(t, readTar(t, out.Bytes()), want)

	for _, x := range []string{"trusted.overlay.redirect", "user.overlay.metacopy"} {
		bad := ext4test.Copy(t, img)
		ext4test.SetXattrs(t, bad, "/upper/opq/new", map[string][]byte{x: []byte("/elsewhere")})
		err := ext4layer.OverlayUpper(context.Background(), io.Discard, ext4test.Open(t, bad), "/upper", ext4layer.Options{})
		if err == nil || !strings.Contains(err.Error(), "/opq/new") || !strings.Contains(err.Error(), "not supported") {
			t.Errorf("%s: %v", x, err)
		}
	}
	// An overlay that was never mounted has no upper directory: nothing
	// changed.
	out.Reset()
	must(t, ext4layer.OverlayUpper(context.Background(), &out, fsys, "/missing", ext4layer.Options{}))
	checkEntries(t, readTar(t, out.Bytes()), nil)

	// Excluded paths are left out with what they hold.
	out.Reset()
	must(t, ext4layer.OverlayUpper(context.Background(), &out, fsys, "/upper", ext4layer.Options{Exclude: []string{"/opq", "uopq"}}))
	var kept []string
	for _, w := range want {
		if !strings.HasPrefix(w, "opq/") && !strings.HasPrefix(w, "uopq/") {
			kept = append(kept, w)
		}
	}
	checkEntries(t, readTar(t, out.Bytes()), kept)
}

// cancelingWriter cancels the context once it has taken n bytes.
type cancelingWriter struct {
	n      int
	cancel context.CancelFunc
}

func (w *cancelingWriter) Write(p []byte) (int, error) {
	w.n -= len(p)
	if w.n <= 0 {
		w.cancel()
	}
	return len(p), nil
}

func TestCancel(t *testing.T) {
	ext4test.Require(t)
	img, _ := fullImage(t)
	fsys := ext4test.Open(t, img)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Cancelled in the middle of a/big, the first file.
	err := ext4layer.Full(ctx, &cancelingWriter{n: 1 << 20, cancel: cancel}, fsys, fsys.Root(), ext4layer.Options{})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "/a/big") {
		t.Errorf("got %v, want a cancellation inside /a/big", err)
	}
}

func TestCorruptEntryNamed(t *testing.T) {
	ext4test.Require(t)
	img, _ := fullImage(t)
	ext4test.Debugfs(t, img, "sif /a/big block[0] 0")
	fsys := ext4test.Open(t, img)
	err := ext4layer.Full(context.Background(), io.Discard, fsys, fsys.Root(), ext4layer.Options{})
	if !errors.Is(err, ext4read.ErrCorrupt) || !strings.Contains(err.Error(), "/a/big") {
		t.Errorf("got %v, want a corruption error naming /a/big", err)
	}
}
