package fstree

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// entry is one tar entry for a test layer.
type entry struct {
	name     string
	typ      byte
	mode     int64
	uid, gid int
	data     string
	link     string
	major    int64
	minor    int64
	mtime    time.Time
	pax      map[string]string
}

func file(name, data string) entry {
	return entry{name: name, typ: tar.TypeReg, mode: 0o644, data: data}
}
func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, mode: 0o777, link: target}
}
func hardlink(name, target string) entry { return entry{name: name, typ: tar.TypeLink, link: target} }
func whiteout(name string) entry {
	d, b := filepath.Split(name)
	return file(d+".wh."+b, "")
}

func layerTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		mt := e.mtime
		if mt.IsZero() {
			mt = time.Unix(1700000000, 0)
		}
		h := &tar.Header{
			Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Linkname: e.link, Devmajor: e.major, Devminor: e.minor, ModTime: mt,
			Size: int64(len(e.data)), PAXRecords: e.pax, Format: tar.FormatPAX,
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte(e.data)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func newTree(t *testing.T) *Tree {
	t.Helper()
	dir := t.TempDir()
	tr, err := New(dir, dir+".data", time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

func apply(t *testing.T, tr *Tree, layers ...[]entry) {
	t.Helper()
	for i, l := range layers {
		if err := tr.Apply(context.Background(), bytes.NewReader(layerTar(t, l...)), "layer"+string(rune('0'+i))); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
	}
}

// content returns the content the tree holds for the file at path.
func content(t *testing.T, tr *Tree, path string) string {
	t.Helper()
	n := tr.Lookup(path)
	if n == nil || n.Inode().Type != TypeReg {
		t.Fatalf("%s is not a regular file", path)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(tr.StagingDir(), path), &st); err != nil || st.Size != n.Inode().Size || st.Blocks != 0 {
		t.Fatalf("%s: want a placeholder of the file's size and no data in staging (%v)", path, err)
	}
	in := n.Inode()
	b := make([]byte, in.Size)
	for _, r := range in.Data() {
		f, err := os.Open(tr.DataFiles()[r.File])
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.ReadAt(b[r.Offset:r.Offset+r.Length], r.DataOffset)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	return string(b)
}

func mustExist(t *testing.T, tr *Tree, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if tr.Lookup(p) == nil {
			t.Errorf("%s: missing from the tree", p)
		}
	}
}

func mustNotExist(t *testing.T, tr *Tree, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if tr.Lookup(p) != nil {
			t.Errorf("%s: still in the tree", p)
		}
		if _, err := os.Lstat(filepath.Join(tr.StagingDir(), p)); err == nil {
			t.Errorf("%s: still staged", p)
		}
	}
}

func TestWhiteouts(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{dir("etc/"), file("etc/a", "a"), file("etc/b", "b"), dir("etc/sub/"), file("etc/sub/c", "c")},
		[]entry{whiteout("etc/a"), whiteout("etc/sub")},
	)
	mustExist(t, tr, "etc", "etc/b")
	mustNotExist(t, tr, "etc/a", "etc/sub", "etc/sub/c", "etc/.wh.a")
}

func TestWhiteoutSparesSameLayer(t *testing.T) {
	// A whiteout hides the lower entry; a same-named entry of its own
	// layer stays, in either order.
	tr := newTree(t)
	apply(t, tr,
		[]entry{file("x", "lower"), file("y", "lower")},
		[]entry{file("x", "upper"), whiteout("x"), whiteout("y"), file("y", "upper")},
	)
	if got := content(t, tr, "x"); got != "upper" {
		t.Errorf("x = %q, want upper", got)
	}
	if got := content(t, tr, "y"); got != "upper" {
		t.Errorf("y = %q, want upper", got)
	}
}

func TestOpaqueDirectory(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{dir("d/"), file("d/old", "1"), dir("d/sub/"), file("d/sub/deep", "2")},
		[]entry{dir("d/"), file("d/new", "3"), file("d/"+opaqueMarker, ""), dir("d/sub/"), file("d/sub/newer", "4")},
	)
	mustExist(t, tr, "d/new", "d/sub/newer")
	mustNotExist(t, tr, "d/old", "d/sub/deep", "d/"+opaqueMarker)
}

func TestReplaceFileAndDirectory(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{file("a", "file"), dir("b/"), file("b/inner", "x")},
		[]entry{dir("a/"), file("a/inside", "y"), file("b", "now a file")},
	)
	if n := tr.Lookup("a"); n == nil || n.Inode().Type != TypeDir {
		t.Fatalf("a should be a directory")
	}
	if got := content(t, tr, "b"); got != "now a file" {
		t.Errorf("b = %q", got)
	}
	mustNotExist(t, tr, "b/inner")
}

func TestDirectoryMergesAndTakesNewMetadata(t *testing.T) {
	tr := newTree(t)
	d2 := dir("d/")
	d2.mode, d2.uid = 0o700, 1000
	apply(t, tr, []entry{dir("d/"), file("d/a", "a")}, []entry{d2, file("d/b", "b")})
	mustExist(t, tr, "d/a", "d/b")
	in := tr.Lookup("d").Inode()
	if in.Mode != 0o700 || in.UID != 1000 {
		t.Errorf("d: mode %o uid %d, want 700 1000", in.Mode, in.UID)
	}
}

func TestHardlinks(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{file("a", "shared"), hardlink("b", "a"), file("lower", "low")},
		[]entry{hardlink("up", "lower"), whiteout("a")},
	)
	mustNotExist(t, tr, "a")
	if got := content(t, tr, "b"); got != "shared" {
		t.Errorf("b = %q after its other name was whited out", got)
	}
	if tr.Lookup("up").Inode() != tr.Lookup("lower").Inode() {
		t.Errorf("up and lower should share an inode")
	}
	var a, b os.FileInfo
	a, _ = os.Stat(filepath.Join(tr.StagingDir(), "up"))
	b, _ = os.Stat(filepath.Join(tr.StagingDir(), "lower"))
	if !os.SameFile(a, b) {
		t.Errorf("up and lower are not hard linked in staging")
	}
}

func TestReplacingOneLinkKeepsTheOther(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{file("a", "old"), hardlink("b", "a")},
		[]entry{file("a", "new")},
	)
	if got := content(t, tr, "b"); got != "old" {
		t.Errorf("b = %q, want the old content", got)
	}
	if got := content(t, tr, "a"); got != "new" {
		t.Errorf("a = %q", got)
	}
}

func TestSymlinkParentsResolveInsideRootfs(t *testing.T) {
	tr := newTree(t)
	apply(t, tr,
		[]entry{dir("usr/"), dir("usr/lib/"), symlink("lib", "usr/lib"), symlink("abs", "/usr")},
		[]entry{file("lib/x", "x"), file("abs/lib/y", "y")},
	)
	mustExist(t, tr, "usr/lib/x", "usr/lib/y")
	if n := tr.Lookup("lib"); n.Inode().Type != TypeSymlink || n.Inode().Target() != "usr/lib" {
		t.Errorf("lib should stay a symlink to usr/lib")
	}
	if fi, err := os.Lstat(filepath.Join(tr.StagingDir(), "lib")); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("lib is not a symlink in staging")
	}
}

func TestUnsafePaths(t *testing.T) {
	cases := map[string][]entry{
		"traversal":         {file("../evil", "x")},
		"inner traversal":   {file("a/../../evil", "x")},
		"absolute":          {file("/etc/evil", "x")},
		"symlink escape":    {symlink("link", "../../../../tmp"), file("link/evil", "x")},
		"hardlink escape":   {hardlink("evil", "../../etc/passwd")},
		"absolute hardlink": {hardlink("evil", "/etc/passwd")},
	}
	for name, entries := range cases {
		t.Run(name, func(t *testing.T) {
			tr := newTree(t)
			err := tr.Apply(context.Background(), bytes.NewReader(layerTar(t, entries...)), "sha256:abc")
			if err == nil {
				t.Fatal("no error")
			}
			var ee *EntryError
			if !errors.As(err, &ee) || ee.Layer != "sha256:abc" || ee.Entry == "" {
				t.Errorf("error %q does not name the layer and entry", err)
			}
			if name != "hardlink escape" && name != "absolute hardlink" && !errors.Is(err, ErrUnsafePath) {
				t.Errorf("error %q is not ErrUnsafePath", err)
			}
		})
	}
}

func TestAbsoluteSymlinkStaysInside(t *testing.T) {
	// An absolute target is resolved inside the rootfs, like a chroot:
	// nothing lands in the host's /tmp.
	tr := newTree(t)
	marker := "kiln-test-" + strings.ReplaceAll(t.Name(), "/", "-")
	apply(t, tr, []entry{symlink("t", "/tmp"), file("t/"+marker, "x")})
	mustExist(t, tr, "tmp/"+marker)
	if _, err := os.Stat(filepath.Join("/tmp", marker)); err == nil {
		t.Fatalf("wrote into the host's /tmp")
	}
}

func TestMetadataFromHeaders(t *testing.T) {
	tr := newTree(t)
	f := file("bin/su", "x")
	f.mode, f.uid, f.gid = 0o4755, 100000, 4000000000
	f.mtime = time.Unix(-86400*365, 123456789)
	f.pax = map[string]string{
		"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
		"SCHILY.xattr.user.note":           "hi",
	}
	dev := entry{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3}
	apply(t, tr, []entry{f, dev, {name: "fifo", typ: tar.TypeFifo, mode: 0o600}})
	in := tr.Lookup("bin/su").Inode()
	if in.Mode != 0o4755 || in.UID != 100000 || in.GID != 4000000000 {
		t.Errorf("bin/su: mode %o owner %d:%d", in.Mode, in.UID, in.GID)
	}
	if !in.Mtime().Equal(f.mtime) {
		t.Errorf("mtime %v, want %v", in.Mtime(), f.mtime)
	}
	if in.Xattrs["security.capability"] != f.pax["SCHILY.xattr.security.capability"] || in.Xattrs["user.note"] != "hi" {
		t.Errorf("xattrs %q", in.Xattrs)
	}
	d := tr.Lookup("dev/null")
	if d.Inode().Type != TypeChar || d.Inode().Major != 1 || d.Inode().Minor != 3 || len(tr.Names(d.Inode())) != 1 {
		t.Errorf("dev/null: %+v", d.Inode())
	}
	if _, err := os.Lstat(filepath.Join(tr.StagingDir(), "dev/null")); err == nil {
		t.Errorf("device nodes must not be staged")
	}
	if fi, err := os.Lstat(filepath.Join(tr.StagingDir(), "fifo")); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("fifo not staged as a fifo")
	}
}

func TestSparseStaging(t *testing.T) {
	tr := newTree(t)
	data := make([]byte, 8<<20)
	data[0], data[len(data)-1] = 1, 2
	apply(t, tr, []entry{file("sparse", string(data))})
	in := tr.Lookup("sparse").Inode()
	if in.Size != int64(len(data)) || in.Blocks() != 2 {
		t.Errorf("size %d blocks %d, want %d and 2", in.Size, in.Blocks(), len(data))
	}
	if got := content(t, tr, "sparse"); got != string(data) {
		t.Errorf("content differs")
	}
}

func TestDeviceLinksFollowWhiteouts(t *testing.T) {
	tr := newTree(t)
	dev := entry{name: "dev/a", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0}
	apply(t, tr, []entry{dev, hardlink("dev/b", "dev/a")}, []entry{whiteout("dev/a")})
	names := tr.Names(tr.Lookup("dev/b").Inode())
	if len(names) != 1 || names[0].Path() != "dev/b" {
		t.Errorf("names %v", names)
	}
}

func TestLongNamesAndOddBytes(t *testing.T) {
	tr := newTree(t)
	long := strings.Repeat("n", 255)
	odd := "a \"quoted\" \\ name\nwith newline \xff\xfe"
	apply(t, tr, []entry{file(long, "x"), file(odd, "y"), symlink("s", strings.Repeat("t/", 2000))})
	mustExist(t, tr, long, odd, "s")
	if err := tr.Apply(context.Background(), bytes.NewReader(layerTar(t, file(long+"n", "x"))), "l"); err == nil {
		t.Errorf("a 256-byte name should be refused")
	}
}

func TestDeviceNameWithLineBreakIsRefused(t *testing.T) {
	// debugfs commands name device nodes; a line break would end one.
	tr := newTree(t)
	dev := entry{name: "dev/null\nmknod x c 1 3", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3}
	err := tr.Apply(context.Background(), bytes.NewReader(layerTar(t, dev)), "sha256:abc")
	var ee *EntryError
	if !errors.As(err, &ee) || ee.Layer != "sha256:abc" || !strings.Contains(err.Error(), "line break") {
		t.Fatalf("err = %v, want an entry error naming the line break", err)
	}
	hdr := &tar.Header{Name: dev.name, Typeflag: tar.TypeChar}
	if err := CheckHeader(hdr); err == nil {
		t.Errorf("CheckHeader should refuse it too")
	}
}

// TestApplyStored takes file contents from the stored tar where they lie:
// nothing is copied into the tree's own data file.
func TestApplyStored(t *testing.T) {
	tr := newTree(t)
	sparse := make([]byte, 3*blockSize+10)
	sparse[0], sparse[len(sparse)-1] = 1, 2
	lower := layerTar(t, file("a", "lower a"), file("b", strings.Repeat("b", 5000)))
	upper := layerTar(t, file("a", "upper a"), file("sparse", string(sparse)), hardlink("c", "b"))
	dir := t.TempDir()
	for i, l := range [][]byte{lower, upper} {
		stored := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		if err := os.WriteFile(stored, l, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := tr.ApplyStored(context.Background(), bytes.NewReader(l), "l", stored); err != nil {
			t.Fatal(err)
		}
	}
	for path, want := range map[string]string{"a": "upper a", "b": strings.Repeat("b", 5000), "c": strings.Repeat("b", 5000), "sparse": string(sparse)} {
		if got := content(t, tr, path); got != want {
			t.Errorf("%s: content differs", path)
		}
	}
	if in := tr.Lookup("sparse").Inode(); in.Blocks() != 2 || len(in.Data()) != 2 {
		t.Errorf("sparse: %d blocks in %d runs, want 2 in 2", in.Blocks(), len(in.Data()))
	}
	if fi, err := os.Stat(tr.DataFiles()[0]); err != nil || fi.Size() != 0 {
		t.Errorf("the tree's own data file should stay empty (%v)", err)
	}
}

// TestACLsMustConvert: a POSIX ACL that ext4 cannot store (not version
// 2, entries not 8 bytes, an unknown tag) fails the layer at its entry,
// rather than the build of the image later, where no layer is known.
func TestACLsMustConvert(t *testing.T) {
	acl := func(entries ...string) string { return "\x02\x00\x00\x00" + strings.Join(entries, "") }
	good := acl("\x01\x00\x07\x00\xff\xff\xff\xff", "\x02\x00\x05\x00\xe8\x03\x00\x00", "\x04\x00\x05\x00\xff\xff\xff\xff",
		"\x10\x00\x05\x00\xff\xff\xff\xff", "\x20\x00\x04\x00\xff\xff\xff\xff")
	for name, value := range map[string]string{
		"good":        good,
		"empty":       acl(),
		"version 1":   "\x01" + good[1:],
		"short entry": good[:len(good)-1],
		"unknown tag": acl("\x40\x00\x07\x00\xff\xff\xff\xff"),
		"no header":   "\x02",
	} {
		t.Run(name, func(t *testing.T) {
			tr := newTree(t)
			d := dir("d")
			d.pax = map[string]string{"SCHILY.xattr.system.posix_acl_default": value}
			err := tr.Apply(context.Background(), bytes.NewReader(layerTar(t, d)), "sha256:abc")
			if name == "good" || name == "empty" {
				if err != nil {
					t.Fatal(err)
				}
				if got := tr.Lookup("d").Inode().Xattrs["system.posix_acl_default"]; got != value {
					t.Errorf("ACL %q, want %q", got, value)
				}
				return
			}
			var ee *EntryError
			if !errors.As(err, &ee) || ee.Layer != "sha256:abc" || ee.Entry != "d" || !strings.Contains(err.Error(), "ACL") {
				t.Fatalf("err = %v, want an entry error naming the ACL", err)
			}
		})
	}
}
