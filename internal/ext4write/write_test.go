package ext4write

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/testenv"
)

// layer is a tar built from headers; a header's content is its PAX
// record "content" (removed before writing), or Size zero bytes... or
// pattern bytes when Size is set without content.
type layer []*tar.Header

var (
	t1   = time.Unix(1700000000, 123456789)
	post = time.Unix(4102444800, 999999999) // 2100
	pre  = time.Unix(-86400*365, 5)         // 1969
)

func reg(name string, mode int64, content string) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode, ModTime: t1, Size: int64(len(content)),
		PAXRecords: map[string]string{"content": content}}
}

func dir(name string, mode int64) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode, ModTime: t1}
}

// tarOf writes headers as a PAX tar; sparse contents are given as data
// with long zero runs, which the tree stores as holes.
func tarOf(t testing.TB, l layer) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range l {
		h := *h
		content := ""
		if h.PAXRecords != nil {
			recs := map[string]string{}
			for k, v := range h.PAXRecords {
				if k == "content" {
					content = v
				} else {
					recs[k] = v
				}
			}
			h.PAXRecords = recs
		}
		h.Format = tar.FormatPAX
		if h.AccessTime.IsZero() {
			h.AccessTime = h.ModTime
		}
		if h.ChangeTime.IsZero() {
			h.ChangeTime = h.ModTime
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(content)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// edgeLayers covers what an image can hold: every file type, hard links
// (to files, devices, symlinks), long and fast symlinks, xattrs in the
// inode and in a block, POSIX ACLs, big ids, special mode bits, times
// before 1970 and after 2038 with nanoseconds, holes, files with many
// extents, and names of every length; a second layer deletes, replaces
// and hides some of it.
func edgeLayers() []layer {
	capValue := string([]byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	acl := string([]byte{2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, 2, 0, 5, 0, 0xe8, 3, 0, 0,
		4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x10, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff})
	xsmall := reg("x/small", 0o755, "caps")
	xsmall.PAXRecords["SCHILY.xattr.security.capability"] = capValue
	xbig := reg("x/big", 0o644, "many xattrs")
	for i := 0; i < 12; i++ {
		xbig.PAXRecords[fmt.Sprintf("SCHILY.xattr.user.attr%02d", i)] = strings.Repeat(strconv.Itoa(i), 40+i)
	}
	xbig.PAXRecords["SCHILY.xattr.trusted.overlay.opaque"] = "y"
	xacl := dir("x/acl", 0o775)
	xacl.PAXRecords = map[string]string{"SCHILY.xattr.system.posix_acl_access": acl, "SCHILY.xattr.system.posix_acl_default": acl}
	ids := reg("own/ids", 0o640, "big ids")
	ids.Uid, ids.Gid = 4000000000, 70000
	old := reg("times/old", 0o644, "1969")
	old.ModTime, old.AccessTime, old.ChangeTime = pre, pre, pre
	future := reg("times/future", 0o644, "2100")
	future.ModTime, future.AccessTime, future.ChangeTime = post, t1, post

	// Data blocks separated by holes: 1, 5 (an extent tree of depth one)
	// and 1500 extents (depth two: more than four leaves of 340).
	sparse := func(name string, runs int, tail int) *tar.Header {
		var b []byte
		for i := 0; i < runs; i++ {
			b = append(b, bytes.Repeat([]byte{byte('a' + i%26)}, 4096)...)
			b = append(b, make([]byte, 4096)...)
		}
		b = append(b, make([]byte, tail)...)
		return reg(name, 0o644, string(b))
	}

	l1 := layer{
		dir("./", 0o755),
		dir("bin", 0o755),
		reg("bin/suid", 0o4755, "suid"),
		reg("bin/sgid", 0o2711, "sgid"),
		dir("tmp", 0o1777),
		reg("empty", 0o600, ""),
		reg("unreadable", 0, "mode zero"),
		reg("data/one-block", 0o644, strings.Repeat("z", 4096)),
		reg("data/tail", 0o644, strings.Repeat("y", 3*4096+17)),
		reg("data/big", 0o644, string(ext4test.Pattern(3<<20+5, 1))),
		sparse("data/holes1", 1, 1<<20),
		sparse("data/holes5", 5, 0),
		sparse("data/holes1500", 1500, 100),
		{Name: "links/fast", Typeflag: tar.TypeSymlink, Linkname: "../bin/suid", ModTime: t1},
		{Name: "links/59", Typeflag: tar.TypeSymlink, Linkname: strings.Repeat("a", 59), ModTime: t1},
		{Name: "links/60", Typeflag: tar.TypeSymlink, Linkname: strings.Repeat("b", 60), ModTime: t1},
		{Name: "links/long", Typeflag: tar.TypeSymlink, Linkname: "/" + strings.Repeat("t/", 2000) + "end", ModTime: t1},
		{Name: "links/hard", Typeflag: tar.TypeLink, Linkname: "bin/suid"},
		{Name: "links/hard2", Typeflag: tar.TypeLink, Linkname: "bin/suid"},
		{Name: "links/fast-again", Typeflag: tar.TypeLink, Linkname: "links/fast"},
		{Name: "links/long-again", Typeflag: tar.TypeLink, Linkname: "links/long"},
		{Name: "dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: t1},
		{Name: "dev/sda", Typeflag: tar.TypeBlock, Mode: 0o660, Devmajor: 8, Devminor: 0, ModTime: t1},
		{Name: "dev/big", Typeflag: tar.TypeChar, Mode: 0o600, Devmajor: 300, Devminor: 70000, ModTime: t1},
		{Name: "dev/null-link", Typeflag: tar.TypeLink, Linkname: "dev/null"},
		{Name: "dev/fifo", Typeflag: tar.TypeFifo, Mode: 0o644, ModTime: t1},
		xsmall, xbig, xacl,
		ids, old, future,
		reg("names/"+strings.Repeat("n", 255), 0o644, "255"),
		reg("names/with space and \"quotes\"", 0o644, "odd"),
		reg("names/caf\xc3\xa9-\xff\xfe", 0o644, "bytes"),
		dir("gone", 0o755),
		reg("gone/file", 0o644, "removed by the next layer"),
		reg("replaced", 0o644, "first"),
		dir("opaque", 0o755),
		reg("opaque/lower", 0o644, "hidden"),
	}
	// A directory of 3,000 names: a hashed directory of one level.
	for i := 0; i < 3000; i++ {
		l1 = append(l1, reg(fmt.Sprintf("many/entry-%05d", i), 0o644, ""))
	}
	// Names long enough that 8,000 need more leaves than one index
	// block holds: two levels.
	for i := 0; i < 8000; i++ {
		l1 = append(l1, reg(deepName(i), 0o644, ""))
	}
	l2 := layer{
		{Name: "gone/.wh..wh..opq", Typeflag: tar.TypeReg, ModTime: t1},
		{Name: ".wh.gone", Typeflag: tar.TypeReg, ModTime: t1},
		reg("replaced", 0o600, "second, longer content"),
		{Name: "opaque/.wh..wh..opq", Typeflag: tar.TypeReg, ModTime: t1},
		reg("opaque/upper", 0o644, "visible"),
	}
	return []layer{l1, l2}
}

func deepName(i int) string { return fmt.Sprintf("deep/%s-%05d", strings.Repeat("L", 244), i) }

// newTree replays layers into a tree, staged on the host if staged is
// set (as the e2fsprogs writer needs).
func newTree(t testing.TB, layers []layer, staged bool) (*fstree.Tree, string) {
	t.Helper()
	work := t.TempDir()
	stage := ""
	if staged {
		stage = filepath.Join(work, "stage")
		if err := os.Mkdir(stage, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	tree, err := fstree.New(stage, filepath.Join(work, "data"), time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if err := tree.Apply(context.Background(), bytes.NewReader(tarOf(t, l)), fmt.Sprintf("layer%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	return tree, work
}

func write(t testing.TB, layers []layer, opts ext4.Options) string {
	t.Helper()
	tree, work := newTree(t, layers, false)
	out := filepath.Join(work, "out.ext4")
	if _, err := Write(context.Background(), tree, out, opts); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestWritersAgree writes the same trees with this writer and with
// e2fsprogs: both images must pass e2fsck and hold the same tree, entry
// by entry, as debugfs reads them.
func TestWritersAgree(t *testing.T) {
	ext4test.Require(t)
	ours, want := writeBoth(t, edgeLayers())
	if len(want) < 11000 {
		t.Errorf("only %d entries described", len(want))
	}
	// The layout this test means to cover is there.
	stat := ext4test.Run(t, "debugfs", "-R", "stat /data/holes1500", ours)
	if !regexp.MustCompile(`\(ETB1\)`).MatchString(stat) {
		t.Errorf("/data/holes1500 should have an extent tree of depth two:\n%.1500s", stat)
	}
	htree := ext4test.Run(t, "debugfs", "-R", "htree /deep", ours)
	if !strings.Contains(htree, "Indirect levels: 1") {
		t.Errorf("/deep should be a two-level hashed directory:\n%.1000s", htree)
	}
	if ext4test.Run(t, "debugfs", "-R", "stat /many", ours); !strings.Contains(ext4test.Run(t, "debugfs", "-R", "htree /many", ours), "Indirect levels: 0") {
		t.Errorf("/many should be a one-level hashed directory")
	}
	if x := ext4test.Run(t, "debugfs", "-R", "stat /x/big", ours); !regexp.MustCompile(`File ACL: [1-9]`).MatchString(x) {
		t.Errorf("/x/big should have an xattr block:\n%s", x)
	}
}

// writeBoth writes layers with this writer and with e2fsprogs, checks
// that both images pass e2fsck and hold the same tree, entry by entry, as
// debugfs reads them, and returns this writer's image and that tree.
func writeBoth(t *testing.T, layers []layer) (string, map[string]string) {
	t.Helper()
	ours := write(t, layers, ext4.Options{Identity: "agree"})
	tree, work := newTree(t, layers, true)
	ref := filepath.Join(work, "e2fsprogs.ext4")
	if _, err := ext4.Build(context.Background(), tree, ref, ext4.Options{Identity: "agree", WorkDir: work}); err != nil {
		t.Fatal(err)
	}
	for _, img := range []string{ours, ref} {
		if err := ext4.Check(context.Background(), img); err != nil {
			t.Fatal(err)
		}
	}
	got, want := ext4test.Describe(t, ours), ext4test.Describe(t, ref)
	for p, w := range want {
		if g, ok := got[p]; !ok {
			t.Errorf("%s: missing", p)
		} else if g != w {
			t.Errorf("%s:\n  kiln:      %q\n  e2fsprogs: %q", p, g, w)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: not in the e2fsprogs image", p)
		}
	}
	return ours, want
}

// TestLostFound: a /lost+found the image holds is written as the image
// says, whatever it is, and none is made when the image has none; e2fsck
// accepts each.
func TestLostFound(t *testing.T) {
	ext4test.Require(t)
	lfDir := dir("lost+found", 0o750)
	lfDir.Uid, lfDir.Gid = 7, 8
	for name, c := range map[string]struct {
		layer layer
		want  string // the start of its description, "" for none
	}{
		"none":     {layer{reg("etc/hello", 0o644, "hi")}, ""},
		"file":     {layer{reg("lost+found", 0o600, "not a directory")}, "Type: regular Mode: 0600\n"},
		"symlink":  {layer{{Name: "lost+found", Typeflag: tar.TypeSymlink, Linkname: "/tmp", ModTime: t1}}, "Type: symlink"},
		"fifo":     {layer{{Name: "lost+found", Typeflag: tar.TypeFifo, Mode: 0o644, ModTime: t1}}, "Type: FIFO"},
		"device":   {layer{{Name: "lost+found", Typeflag: tar.TypeChar, Mode: 0o600, Devmajor: 1, Devminor: 3, ModTime: t1}}, "Type: character special"},
		"hardlink": {layer{reg("etc/x", 0o644, "x"), {Name: "lost+found", Typeflag: tar.TypeLink, Linkname: "etc/x"}}, "hard link of etc/x"},
		"dir":      {layer{lfDir, reg("lost+found/kept", 0o644, "inside")}, "Type: directory Mode: 0750\nUser: 7 Group: 8 "},
		// The name kiln builds a /lost+found under, taken too.
		"file and aside name": {layer{reg("lost+found", 0o600, "lf"), reg("lost+found.kiln", 0o600, "other")}, "Type: regular Mode: 0600\n"},
	} {
		t.Run(name, func(t *testing.T) {
			_, desc := writeBoth(t, []layer{c.layer})
			if got := desc["lost+found"]; !strings.HasPrefix(got, c.want) || (c.want == "") != (got == "") {
				t.Errorf("/lost+found: %q, want %q…", got, c.want)
			}
			if name == "dir" && desc["lost+found/kept"] == "" {
				t.Errorf("/lost+found lost its content")
			}
		})
	}
}

// TestTimes: times across ext4's whole range are stored exactly by both
// writers and pass e2fsck, except those e2fsck would take for mis-encoded
// times before 1970 (2310-04-04 to 2378-04-22: the last second before
// them is stored instead) and those outside ext4's range (clamped).
func TestTimes(t *testing.T) {
	ext4test.Require(t)
	utc := func(y int, m time.Month, d, h, min, s, ns int) time.Time {
		return time.Date(y, m, d, h, min, s, ns, time.UTC)
	}
	beforeGap := utc(2310, 4, 4, 16, 10, 39, 0)
	cases := []struct{ in, want time.Time }{
		{utc(2400, 1, 1, 0, 0, 0, 0), utc(2400, 1, 1, 0, 0, 0, 0)},
		{utc(2400, 1, 1, 12, 0, 0, 123456789), utc(2400, 1, 1, 12, 0, 0, 123456789)},
		{utc(2446, 5, 10, 0, 0, 0, 0), utc(2446, 5, 10, 0, 0, 0, 0)},
		{utc(2446, 5, 10, 22, 38, 55, 5), utc(2446, 5, 10, 22, 38, 55, 5)},
		{utc(2378, 4, 22, 19, 24, 48, 1), utc(2378, 4, 22, 19, 24, 48, 1)},
		{utc(1901, 12, 14, 0, 0, 0, 0), utc(1901, 12, 14, 0, 0, 0, 0)},
		{utc(1969, 12, 31, 23, 59, 59, 500000000), utc(1969, 12, 31, 23, 59, 59, 500000000)},
		{utc(2310, 4, 4, 16, 10, 39, 7), utc(2310, 4, 4, 16, 10, 39, 7)},
		// e2fsck's pre-1970 range.
		{utc(2310, 4, 4, 16, 10, 40, 0), beforeGap},
		{utc(2345, 6, 7, 8, 9, 10, 11), beforeGap},
		{utc(2378, 4, 22, 19, 24, 47, 999999999), beforeGap},
		// Outside ext4's range.
		{utc(2446, 5, 10, 22, 38, 56, 0), utc(2446, 5, 10, 22, 38, 55, 0)},
		{utc(2600, 1, 1, 0, 0, 0, 0), utc(2446, 5, 10, 22, 38, 55, 0)},
		{utc(1850, 1, 1, 0, 0, 0, 0), utc(1901, 12, 13, 20, 45, 52, 0)},
	}
	var l layer
	for i, c := range cases {
		h := reg(fmt.Sprintf("t%02d", i), 0o644, "")
		h.ModTime, h.AccessTime, h.ChangeTime = c.in, c.in, c.in
		l = append(l, h)
	}
	ours, _ := writeBoth(t, []layer{l})
	// e2fsck -fn exits 0 on the times it takes for mis-encoded ones
	// before 1970, but says so (and -y would change them).
	if out := ext4test.Run(t, "e2fsck", "-fn", ours); strings.Contains(out, "pre-1970") {
		t.Errorf("e2fsck -fn:\n%s", out)
	}
	fsys := ext4test.Open(t, ours)
	for i, c := range cases {
		ino, err := fsys.Lookup(fmt.Sprintf("/t%02d", i))
		if err != nil {
			t.Fatal(err)
		}
		in, err := fsys.Inode(ino)
		if err != nil {
			t.Fatal(err)
		}
		for name, got := range map[string]time.Time{"mtime": in.Mtime, "atime": in.Atime, "ctime": in.Ctime} {
			if !got.Equal(c.want) {
				t.Errorf("%s %s: stored %s, want %s", c.in, name, got, c.want)
			}
		}
	}
}

// TestHardLinkedSymlink: a hard link to a symlink is a second name for
// the same inode, as the tar says.
func TestHardLinkedSymlink(t *testing.T) {
	ext4test.Require(t)
	img := write(t, []layer{{
		{Name: "sym", Typeflag: tar.TypeSymlink, Linkname: "target", ModTime: t1, Uid: 7},
		{Name: "again", Typeflag: tar.TypeLink, Linkname: "sym"},
	}}, ext4.Options{Identity: "symlink"})
	if err := ext4.Check(context.Background(), img); err != nil {
		t.Fatal(err)
	}
	desc := ext4test.Describe(t, img)
	if desc["sym"] != "hard link of again" || !strings.Contains(desc["again"], "Links: 2") || !strings.Contains(desc["again"], "User: 7") {
		t.Errorf("again: %q\nsym: %q", desc["again"], desc["sym"])
	}
}

// TestDirHash checks the directory hash against debugfs's.
func TestDirHash(t *testing.T) {
	ext4test.Require(t)
	img := write(t, []layer{{reg("f", 0o644, "")}}, ext4.Options{Identity: "hash"})
	fsys := ext4test.Open(t, img)
	_ = fsys
	sb := make([]byte, 1024)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
	var seed [4]uint32
	for i := range seed {
		seed[i] = uint32(sb[0xEC+4*i]) | uint32(sb[0xED+4*i])<<8 | uint32(sb[0xEE+4*i])<<16 | uint32(sb[0xEF+4*i])<<24
	}
	re := regexp.MustCompile(`Hash of .* is 0x([0-9a-f]+)`)
	for _, name := range []string{"a", "hello", "caf\xc3\xa9", "\xff\x80\x7f", strings.Repeat("x", 31), strings.Repeat("y", 32),
		strings.Repeat("z", 33), strings.Repeat("w", 255)} {
		out := ext4test.Run(t, "debugfs", "-R", "dx_hash -h half_md4 -s "+ext4.DeriveUUID("kiln.hash-seed", "hash")+" "+name, img)
		m := re.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("dx_hash %q: %s", name, out)
		}
		want, _ := strconv.ParseUint(m[1], 16, 32)
		if got := dirHash([]byte(name), seed); got != uint32(want) {
			t.Errorf("dirHash(%q) = %#x, debugfs says %#x", name, got, want)
		}
	}
}

// TestReproducible writes the same tree twice: the same bytes; another
// identity gives another filesystem UUID.
func TestReproducible(t *testing.T) {
	layers := edgeLayers()[:1]
	a := write(t, layers, ext4.Options{Identity: "one", NoSync: true})
	b := write(t, layers, ext4.Options{Identity: "one"})
	c := write(t, layers, ext4.Options{Identity: "two"})
	ba, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	bc, _ := os.ReadFile(c)
	if !bytes.Equal(ba, bb) {
		t.Error("the same tree and identity gave different bytes")
	}
	if bytes.Equal(ba, bc) {
		t.Error("another identity gave the same bytes")
	}
}

// TestNoSpace asks for a filesystem too small for the content: an error
// saying so, and no output left.
func TestNoSpace(t *testing.T) {
	layers := []layer{{reg("big", 0o644, string(ext4test.Pattern(8<<20, 2)))}}
	tree, work := newTree(t, layers, false)
	out := filepath.Join(work, "out.ext4")
	_, err := Write(context.Background(), tree, out, ext4.Options{Size: 6 << 20, Identity: "x"})
	if !errors.Is(err, ext4.ErrNoSpace) {
		t.Fatalf("got %v, want ErrNoSpace", err)
	}
	if _, serr := os.Stat(out); !os.IsNotExist(serr) {
		t.Errorf("a failed write left %s", out)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Write(ctx, tree, out, ext4.Options{Identity: "x"}); !errors.Is(err, context.Canceled) {
		t.Errorf("a cancelled write returned %v", err)
	}
	if _, serr := os.Stat(out); !os.IsNotExist(serr) {
		t.Errorf("a cancelled write left %s", out)
	}
}

// TestKernelReads mounts an image read-only and reads it through the
// kernel: the names of the hashed directories resolve, contents match.
func TestKernelReads(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "mounting an image needs root")
	}
	img := write(t, edgeLayers(), ext4.Options{Identity: "kernel"})
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop,ro", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	for _, name := range []string{"entry-00000", "entry-01500", "entry-02999"} {
		if _, err := os.Lstat(filepath.Join(mnt, "many", name)); err != nil {
			t.Error(err)
		}
	}
	for _, i := range []int{0, 4000, 7999} {
		if _, err := os.Lstat(filepath.Join(mnt, deepName(i))); err != nil {
			t.Error(err)
		}
	}
	got, err := os.ReadFile(filepath.Join(mnt, "data/big"))
	if err != nil || !bytes.Equal(got, ext4test.Pattern(3<<20+5, 1)) {
		t.Errorf("data/big reads back wrong (%v)", err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "replaced")); err != nil || string(got) != "second, longer content" {
		t.Errorf("replaced = %q, %v", got, err)
	}
	if _, err := os.Lstat(filepath.Join(mnt, "gone")); !os.IsNotExist(err) {
		t.Errorf("gone: %v", err)
	}
	for name, want := range map[string]string{"user.attr00": strings.Repeat("0", 40), "user.attr11": strings.Repeat("11", 51), "trusted.overlay.opaque": "y"} {
		buf := make([]byte, 256)
		n, err := unix.Lgetxattr(filepath.Join(mnt, "x/big"), name, buf)
		if err != nil || string(buf[:n]) != want {
			t.Errorf("x/big %s = %q, %v through the kernel", name, buf[:max(n, 0)], err)
		}
	}
	buf := make([]byte, 64)
	if n, err := unix.Lgetxattr(filepath.Join(mnt, "x/acl"), "system.posix_acl_access", buf); err != nil || n != 44 {
		t.Errorf("x/acl's ACL through the kernel: %d bytes, %v", n, err)
	}
}

// TestAllocatorSkipsSuperblocks hands out every block of a filesystem of
// ten groups in runs of all sizes (each run stops at the next
// superblock copy): no run may touch a superblock or
// descriptor copy, and every other block is handed out once.
func TestAllocatorSkipsSuperblocks(t *testing.T) {
	g, err := newGeometry(10*maxPerGroup*blockSize-5*blockSize, 1000)
	if err != nil {
		t.Fatal(err)
	}
	a := newAllocator(g)
	seen := make([]bool, g.blocks)
	for i := int64(1); ; i = i*3 + 1 {
		start, got, err := a.take(min(i, 5*g.bpg))
		if errors.Is(err, errNoSpace) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []piece{{start, got}} {
			for b := p.start; b < p.start+p.length; b++ {
				if a.reservedEnd(b) != b {
					t.Fatalf("block %d (group %d) is a superblock copy", b, b/g.bpg)
				}
				if seen[b] {
					t.Fatalf("block %d handed out twice", b)
				}
				seen[b] = true
			}
		}
	}
	for b, ok := range seen {
		if !ok && a.reservedEnd(int64(b)) == int64(b) {
			t.Fatalf("block %d never handed out", b)
		}
	}
}

// TestSmallFilesystem: below 8 MiB there is no journal, as mke2fs does.
func TestSmallFilesystem(t *testing.T) {
	ext4test.Require(t)
	img := write(t, []layer{{reg("f", 0o644, string(ext4test.Pattern(1<<20, 3)))}}, ext4.Options{Identity: "small", Size: 4 << 20})
	if err := ext4.Check(context.Background(), img); err != nil {
		t.Fatal(err)
	}
	if out := ext4test.Run(t, "dumpe2fs", "-h", img); strings.Contains(out, "has_journal") {
		t.Errorf("a 4 MiB filesystem has a journal:\n%s", out)
	}
}

// TestManyInodes: more inodes than full groups hold (32768 each) make a
// filesystem of more full groups when kiln sizes it, and smaller groups,
// as mke2fs does, when its size is given.
func TestManyInodes(t *testing.T) {
	ext4test.Require(t)
	var l layer
	for i := 0; i < 70000; i++ {
		l = append(l, reg(fmt.Sprintf("d%02d/f%05d", i%50, i), 0o644, ""))
	}
	for _, c := range []struct {
		size   int64
		groups string
	}{{0, `Blocks per group:\s+32768\n`}, {64 << 20, `Blocks per group:\s+[0-9]{3,4}\n`}} {
		img := write(t, []layer{l}, ext4.Options{Identity: "inodes", Size: c.size})
		if err := ext4.Check(context.Background(), img); err != nil {
			t.Fatal(err)
		}
		if out := ext4test.Run(t, "dumpe2fs", "-h", img); !regexp.MustCompile(c.groups).MatchString(out) {
			t.Errorf("size %d: want groups matching %s:\n%s", c.size, c.groups, out)
		}
	}
}

// TestSameBytesWherever: the image does not depend on where the tree
// keeps the contents (its own data file, or stored layer tars as kiln
// serve keeps them) nor on whether the writer turns the tree's data file
// into the image; what later layers replaced reads as zeros.
func TestSameBytesWherever(t *testing.T) {
	layers := edgeLayers()
	opts := ext4.Options{Identity: "wherever", NoSync: true}
	copied := write(t, layers, opts)

	tree, work := newTree(t, layers, false)
	taken := filepath.Join(work, "taken.ext4")
	opts.Take = tree.DataFiles()[0]
	if _, err := Write(context.Background(), tree, taken, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tree.DataFiles()[0]); !os.IsNotExist(err) {
		t.Errorf("the tree's data file is still there: %v", err)
	}

	work = t.TempDir()
	stored, err := fstree.New("", filepath.Join(work, "data"), time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		tarFile := filepath.Join(work, fmt.Sprintf("layer%d.tar", i))
		if err := os.WriteFile(tarFile, tarOf(t, l), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(tarFile)
		if err != nil {
			t.Fatal(err)
		}
		err = stored.ApplyStored(context.Background(), f, fmt.Sprintf("layer%d", i), tarFile)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	fromTars := filepath.Join(work, "stored.ext4")
	if _, err := Write(context.Background(), stored, fromTars, opts); err != nil {
		t.Fatal(err)
	}

	// As kiln serve keeps layers: each stored as a record and a data
	// file, the image built in the top layer's.
	inTop := writeFromStored(t, layers, opts)

	want, _ := os.ReadFile(copied)
	for _, img := range []string{taken, fromTars, inTop} {
		got, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			for i := range got {
				if got[i] != want[i] {
					t.Errorf("%s differs from the image written by copying, first at byte %d (block %d)", filepath.Base(img), i, i/blockSize)
					break
				}
			}
		}
	}
	if err := ext4.Check(context.Background(), taken); err != nil {
		t.Fatal(err)
	}
}

// storedTree stores each layer in work with fstree.StoreLayer, as kiln
// serve keeps layers, and replays the records into a tree; a layer's
// data file is found under its name or later as image.ext4. It returns
// the tree and the data files.
func storedTree(t *testing.T, work string, layers []layer) (*fstree.Tree, []string) {
	t.Helper()
	tree, err := fstree.New("", filepath.Join(work, "own"), time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	var datas []string
	for i, l := range layers {
		name := fmt.Sprintf("layer%d", i)
		data, err := os.Create(filepath.Join(work, name+".data"))
		if err != nil {
			t.Fatal(err)
		}
		var record bytes.Buffer
		_, err = fstree.StoreLayer(context.Background(), bytes.NewReader(tarOf(t, l)), name, fstree.Limits{}, tree.DataSpace(), data, &record)
		data.Close()
		if err == nil {
			err = tree.ApplyStoredLayer(context.Background(), &record, name, data.Name(), filepath.Join(work, "image.ext4"))
		}
		if err != nil {
			t.Fatal(err)
		}
		datas = append(datas, data.Name())
	}
	return tree, datas
}

// writeFromStored writes the image of a storedTree in the top layer's
// data file. The top layer's contents must still be where its record
// says.
func writeFromStored(t *testing.T, layers []layer, opts ext4.Options) string {
	t.Helper()
	work := t.TempDir()
	tree, datas := storedTree(t, work, layers)
	top := datas[len(datas)-1]
	before, err := os.ReadFile(top)
	if err != nil {
		t.Fatal(err)
	}
	opts.Take = top
	img := filepath.Join(work, "image.ext4")
	if _, err := Write(context.Background(), tree, img, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(top); !os.IsNotExist(err) {
		t.Errorf("the top layer's data file is still there: %v", err)
	}
	after, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// Every file of the top layer reads the same from the image at its
	// runs, found through the data file's later name.
	_ = tree.Walk(func(n *fstree.Node) error {
		for _, r := range n.Inode().Data() {
			if r.File != len(datas) {
				continue
			}
			if !bytes.Equal(after[r.DataOffset:r.DataOffset+r.Length], before[r.DataOffset:r.DataOffset+r.Length]) {
				t.Errorf("%s: its content at %d moved or changed when the data file became the image", n.Path(), r.DataOffset)
			}
			f, err := tree.OpenData(r.File)
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
		return nil
	})
	return img
}

// TestWhiteoutWithContent: a whiteout entry that carries content (a tar
// may give it any) takes no room in the data space, whichever way the
// layer is kept: the images are the same.
func TestWhiteoutWithContent(t *testing.T) {
	layers := []layer{
		{dir("d", 0o755), reg("d/gone", 0o644, "x")},
		{reg("d/.wh.gone", 0o644, strings.Repeat("w", 8192)), reg("d/a", 0o644, "hello")},
	}
	opts := ext4.Options{Identity: "whiteout", NoSync: true}
	want, _ := os.ReadFile(write(t, layers, opts))
	if got, _ := os.ReadFile(writeFromStored(t, layers, opts)); !bytes.Equal(got, want) {
		t.Errorf("the image built from stored layers differs from the one built by applying them")
	}
}

// TestTakeKeepsContent: a data file that layers above still read is
// not made the image when the image leaves some of its content out (a
// file the layer replaced itself): the image would free it. The image is
// the same either way.
func TestTakeKeepsContent(t *testing.T) {
	layers := []layer{
		{reg("a", 0o644, strings.Repeat("a", 10000))},
		{reg("b", 0o644, strings.Repeat("b", 9000)), reg("b", 0o644, "short")},
	}
	copied := write(t, layers, ext4.Options{Identity: "keeps", NoSync: true})
	work := t.TempDir()
	tree, datas := storedTree(t, work, layers)
	top := datas[len(datas)-1]
	before, _ := os.ReadFile(top)
	img := filepath.Join(work, "image.ext4")
	if _, err := Write(context.Background(), tree, img, ext4.Options{Identity: "keeps", NoSync: true, Take: top, TakeKeeps: true}); err != nil {
		t.Fatal(err)
	}
	if after, err := os.ReadFile(top); err != nil || !bytes.Equal(after, before) {
		t.Errorf("the data file was taken or changed: %v", err)
	}
	want, _ := os.ReadFile(copied)
	if got, _ := os.ReadFile(img); !bytes.Equal(got, want) {
		t.Errorf("the image differs from the one written by copying")
	}
}

// TestSizeWithReplacedContent: an explicit size need not hold what later
// layers replaced; the data space is packed then, the same way whichever
// mode writes it.
func TestSizeWithReplacedContent(t *testing.T) {
	ext4test.Require(t)
	layers := []layer{{reg("big", 0o644, string(ext4test.Pattern(40<<20, 4)))}, {reg("big", 0o644, "tiny")}}
	var imgs []string
	for _, take := range []bool{false, true} {
		tree, work := newTree(t, layers, false)
		out := filepath.Join(work, "out.ext4")
		opts := ext4.Options{Identity: "packed", Size: 32 << 20}
		if take {
			opts.Take = tree.DataFiles()[0]
		}
		if _, err := Write(context.Background(), tree, out, opts); err != nil {
			t.Fatal(err)
		}
		if err := ext4.Check(context.Background(), out); err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, out)
	}
	a, _ := os.ReadFile(imgs[0])
	b, _ := os.ReadFile(imgs[1])
	if !bytes.Equal(a, b) {
		t.Error("the packed image depends on Take")
	}
	if got := ext4test.Describe(t, imgs[0])["big"]; !strings.Contains(got, "Size: 4") {
		t.Errorf("big: %q", got)
	}
}

// TestAutoSizeXattrs: inodes whose attributes just miss the room in the
// inode each need a block, which the automatic size counts.
func TestAutoSizeXattrs(t *testing.T) {
	ext4test.Require(t)
	var l layer
	for i := 0; i < 22000; i++ {
		h := reg(fmt.Sprintf("d%02d/f%05d", i%20, i), 0o644, "")
		h.PAXRecords["SCHILY.xattr.user.a"] = strings.Repeat("v", 70)
		l = append(l, h)
	}
	img := write(t, []layer{l}, ext4.Options{Identity: "xattrs"})
	if err := ext4.Check(context.Background(), img); err != nil {
		t.Fatal(err)
	}
}

// TestXattrsTooBig: attributes past the inode and one block fail the
// write, naming the file, the root directory included.
func TestXattrsTooBig(t *testing.T) {
	for _, name := range []string{"./", "etc/big"} {
		h := dir(name, 0o755)
		h.PAXRecords = map[string]string{"SCHILY.xattr.user.big": strings.Repeat("x", 5000)}
		tree, work := newTree(t, []layer{{h}}, false)
		_, err := Write(context.Background(), tree, filepath.Join(work, "out.ext4"), ext4.Options{Identity: "xattrs"})
		want := strconv.Quote("/" + strings.TrimPrefix(name, "./"))
		if !errors.Is(err, errXattrSpace) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want one naming %s", name, err, want)
		}
	}
}
