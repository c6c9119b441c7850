package integration

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/kilnfs/kiln/integration/ext4inspect"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/integration/testregistry"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

func inspect(t *testing.T, image string) *ext4inspect.FS {
	t.Helper()
	start := time.Now()
	im, err := ext4inspect.Inspect(context.Background(), image, ext4inspect.Options{})
	if err != nil {
		t.Fatalf("inspecting %s: %v", image, err)
	}
	t.Logf("inspected %d entries in %v", len(im.Entries), time.Since(start).Round(time.Millisecond))
	return im
}

// readTarExpect reads a layer tar into per-path expectations.
func readTarExpect(t *testing.T, file string) map[string]expect {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	out := map[string]*expect{}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := tarPath(hdr.Name)
		e := &expect{
			mode: uint32(hdr.Mode) & 0o7777, uid: uint32(hdr.Uid), gid: uint32(hdr.Gid),
			mtime: hdr.ModTime, links: 1,
		}
		for k, v := range hdr.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if e.xattrs == nil {
					e.xattrs = map[string]string{}
				}
				e.xattrs[x] = v
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			e.typ = ext4inspect.Dir
		case tar.TypeReg:
			e.typ = ext4inspect.Regular
			h := sha256.New()
			if _, err := io.Copy(h, tr); err != nil {
				t.Fatal(err)
			}
			e.sha = hex.EncodeToString(h.Sum(nil))
		case tar.TypeLink:
			e.sameAs = tarPath(hdr.Linkname)
		case tar.TypeSymlink:
			e.typ, e.target = ext4inspect.Symlink, hdr.Linkname
		case tar.TypeChar:
			e.typ, e.major, e.minor = ext4inspect.CharDev, uint32(hdr.Devmajor), uint32(hdr.Devminor)
		case tar.TypeBlock:
			e.typ, e.major, e.minor = ext4inspect.BlockDev, uint32(hdr.Devmajor), uint32(hdr.Devminor)
		case tar.TypeFifo:
			e.typ = ext4inspect.Fifo
		default:
			t.Fatalf("%s: unexpected tar type %q", hdr.Name, hdr.Typeflag)
		}
		out[p] = e
	}
	// A hard link is the same inode as its first name: count the names.
	for p, e := range out {
		if e.sameAs == "" {
			continue
		}
		first := out[e.sameAs]
		if first == nil || first.sameAs != "" {
			t.Fatalf("%s: hard link to %q, which is not an earlier file", p, e.sameAs)
		}
		first.links++
	}
	want := make(map[string]expect, len(out))
	for p, e := range out {
		if first := out[e.sameAs]; e.sameAs != "" {
			e.typ, e.sha, e.links = first.typ, first.sha, first.links
		}
		want[p] = *e
	}
	return want
}

func tarPath(name string) string {
	name = strings.TrimPrefix(name, "./")
	name = strings.Trim(name, "/")
	if name == "" || name == "." {
		return "/"
	}
	return "/" + name
}

// TestConvertMinbaseRegistry converts a real Debian tree pushed to the
// registry and compares the image with the layer tar entry by entry.
func TestConvertMinbaseRegistry(t *testing.T) {
	ref := minbaseRef(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "rootfs.ext4")
	s := convert(t, ref, out, filepath.Join(dir, "cache"))
	t.Logf("summary: %+v", *s)
	if s.Cached || s.Image != ref || s.Platform != "linux/amd64" && runtime.GOARCH == "amd64" {
		t.Errorf("summary %+v", *s)
	}
	if want := mustDigest(t, minbase.img); s.Digest != want {
		t.Errorf("digest %s, want %s", s.Digest, want)
	}
	fsck(t, out)
	im := inspect(t, out)
	want := readTarExpect(t, minbase.tar)
	// Not in the tar; e2fsck would create it only to reconnect orphans.
	want["/lost+found"] = expect{typ: ext4inspect.Dir, anyMeta: true, optional: true}
	checkExpectations(t, im, want)
	t.Logf("compared %d tar entries", len(want))
}

func reportProblems(t *testing.T, problems []string) {
	t.Helper()
	for i, p := range problems {
		if i == 30 {
			t.Errorf("... and %d more", len(problems)-30)
			break
		}
		t.Error(p)
	}
}

func xattrsEqual(got map[string][]byte, want map[string]string) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		g, ok := got[k]
		if !ok || string(g) != v {
			return false
		}
	}
	return true
}

// Layer times of the edge-case image, each with nanoseconds.
var (
	t1 = time.Unix(1600000000, 100000001)
	t2 = time.Unix(1650000000, 200000002)
	t3 = time.Unix(1680000000, 300000003)
	t4 = time.Unix(1690000000, 400000004)
)

// Long names and targets of the edge-case image.
var (
	name255   = strings.Repeat("n", 255)
	deepDirs  = []string{strings.Repeat("a", 200), strings.Repeat("b", 200), strings.Repeat("c", 200), strings.Repeat("d", 200), strings.Repeat("e", 200)}
	deepPath  = "long/" + strings.Join(deepDirs, "/") + "/deep"
	target70  = strings.Repeat("x", 70)
	target4k  = "/" + strings.Repeat("y/", 1999) + "z"
	capValue  = string([]byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) // vfs_cap_data v2: cap_net_bind_service, effective
	longXattr = strings.Repeat("L", 100)
	sparseLen = 8 << 20
)

func sparseBody() string {
	b := make([]byte, sparseLen)
	copy(b, "head")
	copy(b[len(b)-4:], "tail")
	return string(b)
}

// edgeImage is a four-layer image (gzip, zstd, uncompressed, gzip) full of
// what layer semantics and ext4 make awkward.
func edgeImage(t *testing.T) testimage.Image {
	l1 := layerTar(t,
		tDir("etc", 0o755, t1),
		tFile("etc/hosts", 0o644, t1, "127.0.0.1 localhost\n"),
		tDir("wh", 0o755, t1),
		tFile("wh/file1", 0o644, t1, "f1"),
		tDir("wh/dir1", 0o755, t1),
		tFile("wh/dir1/inner", 0o644, t1, "inner"),
		tFile("wh/keep", 0o644, t1, "keep"),
		tDir("opq", 0o755, t1),
		tFile("opq/lower1", 0o644, t1, "l1"),
		tDir("opq/lowerdir", 0o755, t1),
		tFile("opq/lowerdir/x", 0o644, t1, "x"),
		tFile("f2d", 0o644, t1, "a file that becomes a directory"),
		tDir("d2f", 0o755, t1),
		tFile("d2f/child", 0o644, t1, "child"),
		tDir("hl", 0o755, t1),
		tFile("hl/lower", 0o644, t1, "lower content"),
		tDir("hw", 0o755, t1),
		tFile("hw/a", 0o644, t1, "shared by a and b"),
		tHardlink("hw/b", "hw/a", t1),
		tDir("usr", 0o755, t1),
		tDir("usr/lib", 0o755, t1),
		tSymlink("lib", "usr/lib", t1),
		tSymlink("alib", "/usr/lib", t1),
	)
	xattrFile := tFile("xa/file", 0o644, t2, "with xattrs")
	xattrFile.hdr.PAXRecords = map[string]string{
		"SCHILY.xattr.security.capability": capValue,
		"SCHILY.xattr.user.foo":            "bar",
		"SCHILY.xattr.trusted.bar":         "baz",
		"SCHILY.xattr.user.long":           longXattr,
	}
	xattrDir := tDir("xa/dir", 0o755, t2)
	xattrDir.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.d": "on a directory"}
	big := tFile("own/big", 0o644, t2, "big ids")
	big.hdr.Uid, big.hdr.Gid = 100000, 100000
	huge := tFile("own/huge", 0o644, t2, "huge ids")
	huge.hdr.Uid, huge.hdr.Gid = 4000000000, 4000000000
	l2 := layerTar(t,
		tFile("wh/samelayer", 0o644, t2, "same"),
		tWhiteout("wh/.wh.file1", t2),
		tWhiteout("wh/.wh.dir1", t2),
		tWhiteout("wh/.wh.samelayer", t2), // same layer: no effect
		tWhiteout("wh/.wh.nothing", t2),   // nothing to hide
		tDir("opq", 0o750, t2),
		tFile("opq/new", 0o644, t2, "new"),
		tWhiteout("opq/.wh..wh..opq", t2),
		tFile("opq/new2", 0o644, t2, "new2"),
		tDir("f2d", 0o755, t2),
		tFile("f2d/inside", 0o644, t2, "inside"),
		tFile("d2f", 0o600, t2, "now a file"),
		tHardlink("hl/link1", "hl/lower", t1), // to a file of a lower layer
		tFile("hl/same1", 0o644, t2, "same-layer link"),
		tHardlink("hl/same2", "hl/same1", t2),
		tFile("lib/x", 0o644, t2, "through the lib symlink"),
		tFile("alib/y", 0o644, t2, "through the absolute symlink"),
		tDir("own", 0o755, t2),
		big, huge,
		tDir("modes", 0o755, t2),
		tFile("modes/suid", 0o4755, t2, "suid"),
		tFile("modes/sgid", 0o2755, t2, "sgid"),
		tDir("modes/sticky", 0o1777, t2),
		tFile("modes/none", 0, t2, "none"),
		tDir("xa", 0o755, t2),
		xattrFile, xattrDir,
		tDir("dev", 0o755, t2),
		tDevice("dev/null", tar.TypeChar, 1, 3, 0o666, t2),
		tDevice("dev/sda", tar.TypeBlock, 8, 0, 0o660, t2),
		tDevice("dev/nvme", tar.TypeBlock, 259, 65536, 0o660, t2), // beyond 16 bits of minor
		tDevice("dev/fifo", tar.TypeFifo, 0, 0, 0o644, t2),
	)
	l3entries := []tarEntry{
		tWhiteout("hw/.wh.a", t3),
		tDir("time", 0o755, t3),
		tFile("time/old", 0o644, t3, "1969"),
		tFile("time/future", 0o644, t3, "2100"),
		tFile("time/nano", 0o644, t3, "nano"),
		tDir("sparse", 0o755, t3),
		tFile("sparse/file", 0o644, t3, sparseBody()),
		tDir("long", 0o755, t3),
		tFile("long/"+name255, 0o644, t3, "255"),
	}
	l3entries[2].hdr.ModTime = time.Unix(-86400*365, 0)
	l3entries[3].hdr.ModTime = time.Date(2100, 1, 1, 12, 0, 0, 500000000, time.UTC)
	l3entries[4].hdr.ModTime = time.Unix(1700000000, 987654321)
	p := "long"
	for _, d := range deepDirs {
		p += "/" + d
		l3entries = append(l3entries, tDir(p, 0o755, t3))
	}
	l3entries = append(l3entries,
		tFile(deepPath, 0o644, t3, "deep"),
		tDir("links", 0o755, t3),
		tSymlink("links/t70", target70, t3),
		tSymlink("links/t4000", target4k, t3),
		tSymlink("links/rel", "../etc/hosts", t3),
		tSymlink("links/abs", "/etc/hosts", t3),
		tSymlink("links/dangling", "does/not/exist", t3),
		tDir("names", 0o755, t3),
		tFile("names/with space", 0o644, t3, "space"),
		tFile(`names/quo"te`, 0o644, t3, "quote"),
		tFile(`names/back\slash`, 0o644, t3, "backslash"),
		tFile("names/new\nline", 0o644, t3, "newline"),
		tFile("names/\xff\xfe", 0o644, t3, "not utf-8"),
		tFile("implicit/child", 0o644, t3, "parent left implicit"),
	)
	l3 := layerTar(t, l3entries...)
	l4 := layerTar(t,
		tFile("wh/file1", 0o640, t4, "reborn"), // whited out in layer 2, back now
	)
	return testimage.Image{
		Layers: []testimage.Layer{
			{Tar: l1, Compression: testimage.Gzip},
			{Tar: l2, Compression: testimage.Zstd},
			{Tar: l3, Compression: testimage.None},
			{Tar: l4, Compression: testimage.Gzip},
		},
		Config: v1.Config{Cmd: []string{"/bin/true"}},
	}
}

// expect is what a path of the edge-case image must hold, written by hand
// from the layer semantics: later layers replace earlier entries (a
// directory over a directory keeps the children and takes the new
// metadata), .wh.NAME hides NAME of lower layers, .wh..wh..opq hides
// everything lower layers put in its directory, hard links share an inode.
type expect struct {
	typ          ext4inspect.Type
	mode         uint32
	uid, gid     uint32
	mtime        time.Time
	content      string
	sha          string // instead of content: its SHA-256, sparseness not checked
	target       string
	links        uint32 // checked for everything but directories
	major, minor uint32
	xattrs       map[string]string
	sparse       bool
	sameAs       string // a path that must be the same inode
	anyMeta      bool   // only the type is defined (implicit directories)
	optional     bool   // may be absent
}

func eDir(mode uint32, mtime time.Time) expect {
	return expect{typ: ext4inspect.Dir, mode: mode, mtime: mtime}
}
func eFile(mode uint32, mtime time.Time, content string) expect {
	return expect{typ: ext4inspect.Regular, mode: mode, mtime: mtime, content: content, links: 1}
}
func eLink(target string, mtime time.Time) expect {
	return expect{typ: ext4inspect.Symlink, mode: 0o777, mtime: mtime, target: target, links: 1}
}

func edgeExpectations() map[string]expect {
	w := map[string]expect{
		"/etc":       eDir(0o755, t1),
		"/etc/hosts": eFile(0o644, t1, "127.0.0.1 localhost\n"),
		// Whiteouts: file1 and dir1 gone (file1 re-created by layer 4),
		// a same-layer whiteout hides nothing.
		"/wh":           eDir(0o755, t1),
		"/wh/keep":      eFile(0o644, t1, "keep"),
		"/wh/samelayer": eFile(0o644, t2, "same"),
		"/wh/file1":     eFile(0o640, t4, "reborn"),
		// Opaque: lower children gone, this layer's kept on both sides of
		// the marker; the directory takes layer 2's metadata.
		"/opq":      eDir(0o750, t2),
		"/opq/new":  eFile(0o644, t2, "new"),
		"/opq/new2": eFile(0o644, t2, "new2"),
		// A file replaced by a directory, a directory by a file.
		"/f2d":        eDir(0o755, t2),
		"/f2d/inside": eFile(0o644, t2, "inside"),
		"/d2f":        eFile(0o600, t2, "now a file"),
		// Hard links: to a lower layer's file and within a layer.
		"/hl":       eDir(0o755, t1),
		"/hl/lower": {typ: ext4inspect.Regular, mode: 0o644, mtime: t1, content: "lower content", links: 2},
		"/hl/link1": {typ: ext4inspect.Regular, mode: 0o644, mtime: t1, content: "lower content", links: 2, sameAs: "/hl/lower"},
		"/hl/same1": {typ: ext4inspect.Regular, mode: 0o644, mtime: t2, content: "same-layer link", links: 2},
		"/hl/same2": {typ: ext4inspect.Regular, mode: 0o644, mtime: t2, content: "same-layer link", links: 2, sameAs: "/hl/same1"},
		// The other name of hw/b was whited out: b keeps the content alone.
		"/hw":   eDir(0o755, t1),
		"/hw/b": eFile(0o644, t1, "shared by a and b"),
		// Writing below directory symlinks lands in their targets.
		"/usr":       eDir(0o755, t1),
		"/usr/lib":   eDir(0o755, t1),
		"/lib":       eLink("usr/lib", t1),
		"/alib":      eLink("/usr/lib", t1),
		"/usr/lib/x": eFile(0o644, t2, "through the lib symlink"),
		"/usr/lib/y": eFile(0o644, t2, "through the absolute symlink"),
		// Owners beyond 16 bits.
		"/own":      eDir(0o755, t2),
		"/own/big":  {typ: ext4inspect.Regular, mode: 0o644, mtime: t2, content: "big ids", links: 1, uid: 100000, gid: 100000},
		"/own/huge": {typ: ext4inspect.Regular, mode: 0o644, mtime: t2, content: "huge ids", links: 1, uid: 4000000000, gid: 4000000000},
		// Special mode bits.
		"/modes":        eDir(0o755, t2),
		"/modes/suid":   eFile(0o4755, t2, "suid"),
		"/modes/sgid":   eFile(0o2755, t2, "sgid"),
		"/modes/sticky": eDir(0o1777, t2),
		"/modes/none":   eFile(0, t2, "none"),
		// Extended attributes, binary and long values, on a file and a
		// directory.
		"/xa": eDir(0o755, t2),
		"/xa/file": {typ: ext4inspect.Regular, mode: 0o644, mtime: t2, content: "with xattrs", links: 1, xattrs: map[string]string{
			"security.capability": capValue, "user.foo": "bar", "trusted.bar": "baz", "user.long": longXattr,
		}},
		"/xa/dir": {typ: ext4inspect.Dir, mode: 0o755, mtime: t2, xattrs: map[string]string{"user.d": "on a directory"}},
		// Device nodes and a fifo.
		"/dev":      eDir(0o755, t2),
		"/dev/null": {typ: ext4inspect.CharDev, mode: 0o666, mtime: t2, major: 1, minor: 3, links: 1},
		"/dev/sda":  {typ: ext4inspect.BlockDev, mode: 0o660, mtime: t2, major: 8, minor: 0, links: 1},
		"/dev/nvme": {typ: ext4inspect.BlockDev, mode: 0o660, mtime: t2, major: 259, minor: 65536, links: 1},
		"/dev/fifo": {typ: ext4inspect.Fifo, mode: 0o644, mtime: t2, links: 1},
		// Times before 1970, after 2038, with nanoseconds.
		"/time":        eDir(0o755, t3),
		"/time/old":    eFile(0o644, time.Unix(-86400*365, 0), "1969"),
		"/time/future": eFile(0o644, time.Date(2100, 1, 1, 12, 0, 0, 500000000, time.UTC), "2100"),
		"/time/nano":   eFile(0o644, time.Unix(1700000000, 987654321), "nano"),
		// A file that is mostly zeros is stored sparse.
		"/sparse":      eDir(0o755, t3),
		"/sparse/file": {typ: ext4inspect.Regular, mode: 0o644, mtime: t3, content: sparseBody(), links: 1, sparse: true},
		// Long names and paths.
		"/long":            eDir(0o755, t3),
		"/long/" + name255: eFile(0o644, t3, "255"),
		"/" + deepPath:     eFile(0o644, t3, "deep"),
		// Symlink targets are stored verbatim, fast and slow.
		"/links":          eDir(0o755, t3),
		"/links/t70":      eLink(target70, t3),
		"/links/t4000":    eLink(target4k, t3),
		"/links/rel":      eLink("../etc/hosts", t3),
		"/links/abs":      eLink("/etc/hosts", t3),
		"/links/dangling": eLink("does/not/exist", t3),
		// Names with bytes that need care.
		"/names":            eDir(0o755, t3),
		"/names/with space": eFile(0o644, t3, "space"),
		`/names/quo"te`:     eFile(0o644, t3, "quote"),
		`/names/back\slash`: eFile(0o644, t3, "backslash"),
		"/names/new\nline":  eFile(0o644, t3, "newline"),
		"/names/\xff\xfe":   eFile(0o644, t3, "not utf-8"),
		"/implicit":         {typ: ext4inspect.Dir, anyMeta: true},
		"/implicit/child":   eFile(0o644, t3, "parent left implicit"),
		"/":                 {typ: ext4inspect.Dir, anyMeta: true},
		// mke2fs makes lost+found; kiln may keep it or remove it.
		"/lost+found": {typ: ext4inspect.Dir, anyMeta: true, optional: true},
	}
	p := "/long"
	for _, d := range deepDirs {
		p += "/" + d
		w[p] = eDir(0o755, t3)
	}
	return w
}

// TestConvertEdgeCases converts the edge-case image from the registry and
// checks every path against the hand-written expectations; nothing else
// may be in the image.
func TestConvertEdgeCases(t *testing.T) {
	img := mustBuild(t, edgeImage(t))
	ref := mustPush(t, "edge:v1", img)
	dir := t.TempDir()
	out := filepath.Join(dir, "rootfs.ext4")
	convert(t, ref, out, filepath.Join(dir, "cache"))
	fsck(t, out)
	im := inspect(t, out)
	checkExpectations(t, im, edgeExpectations())

	// Spelled out, for the reader of a failure: what the layers removed.
	for _, gone := range []string{"/wh/dir1", "/wh/dir1/inner", "/opq/lower1", "/opq/lowerdir", "/opq/lowerdir/x",
		"/d2f/child", "/hw/a", "/lib/x", "/wh/.wh.file1", "/opq/.wh..wh..opq", "/hw/.wh.a"} {
		if im.Entries[gone] != nil {
			t.Errorf("%q is in the image; the layers removed it (or never put it there)", gone)
		}
	}
}

func checkExpectations(t *testing.T, im *ext4inspect.FS, want map[string]expect) {
	t.Helper()
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	for _, p := range slices.Sorted(maps.Keys(want)) {
		w, e := want[p], im.Entries[p]
		if e == nil {
			if !w.optional {
				bad("%q: missing", p)
			}
			continue
		}
		if e.Type != w.typ {
			bad("%q: type %s, want %s", p, e.Type, w.typ)
			continue
		}
		if w.anyMeta {
			continue
		}
		if e.Mode != w.mode || e.UID != w.uid || e.GID != w.gid {
			bad("%q: mode %04o owner %d:%d, want %04o %d:%d", p, e.Mode, e.UID, e.GID, w.mode, w.uid, w.gid)
		}
		if !e.Mtime.Equal(w.mtime) {
			bad("%q: mtime %v, want %v", p, e.Mtime.UTC(), w.mtime.UTC())
		}
		if !xattrsEqual(e.Xattrs, w.xattrs) {
			bad("%q: xattrs %q, want %q", p, e.Xattrs, w.xattrs)
		}
		if w.typ != ext4inspect.Dir && e.Links != w.links {
			bad("%q: %d links, want %d", p, e.Links, w.links)
		}
		switch w.typ {
		case ext4inspect.Regular:
			if w.sha != "" {
				if e.SHA256 != w.sha {
					bad("%q: content sha256 %s, want %s", p, e.SHA256, w.sha)
				}
				break
			}
			sum := sha256.Sum256([]byte(w.content))
			if e.SHA256 != hex.EncodeToString(sum[:]) || e.Size != int64(len(w.content)) {
				bad("%q: content differs (size %d, want %d)", p, e.Size, len(w.content))
			}
			if e.Sparse != w.sparse {
				bad("%q: sparse %v, want %v (size %d, %d sectors)", p, e.Sparse, w.sparse, e.Size, e.Blocks)
			}
		case ext4inspect.Symlink:
			if e.Target != w.target {
				bad("%q: target %.120q, want %.120q", p, e.Target, w.target)
			}
		case ext4inspect.CharDev, ext4inspect.BlockDev:
			if e.Major != w.major || e.Minor != w.minor {
				bad("%q: device %d:%d, want %d:%d", p, e.Major, e.Minor, w.major, w.minor)
			}
		}
		if w.sameAs != "" && (im.Entries[w.sameAs] == nil || im.Entries[w.sameAs].Ino != e.Ino) {
			bad("%q: not the same inode as %q", p, w.sameAs)
		}
	}
	for _, p := range im.Paths() {
		if _, ok := want[p]; !ok {
			bad("%q: in the image, not expected", p)
		}
	}
	reportProblems(t, problems)
}

// TestConvertLargeDeviceNumbers: device numbers beyond 8 bits of major
// and minor, which ext4 stores in the "new" encoding, up to Linux's limits
// of 12 bits of major and 20 of minor; debugfs mknod itself stops at 65535.
func TestConvertLargeDeviceNumbers(t *testing.T) {
	l := layerTar(t,
		tDir("dev", 0o755, t1),
		tDevice("dev/nvme", tar.TypeBlock, 259, 65536, 0o660, t1),
		tDevice("dev/max", tar.TypeChar, 4095, 1048575, 0o600, t1),
		tDevice("dev/mid", tar.TypeChar, 300, 70000, 0o600, t1),
	)
	ref := mustPush(t, "bigdev:v1", mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: l}}}))
	dir := t.TempDir()
	out := filepath.Join(dir, "rootfs.ext4")
	convert(t, ref, out, filepath.Join(dir, "cache"))
	fsck(t, out)
	checkExpectations(t, inspect(t, out), map[string]expect{
		"/":           {typ: ext4inspect.Dir, anyMeta: true},
		"/lost+found": {typ: ext4inspect.Dir, anyMeta: true, optional: true},
		"/dev":        eDir(0o755, t1),
		"/dev/nvme":   {typ: ext4inspect.BlockDev, mode: 0o660, mtime: t1, major: 259, minor: 65536, links: 1},
		"/dev/max":    {typ: ext4inspect.CharDev, mode: 0o600, mtime: t1, major: 4095, minor: 1048575, links: 1},
		"/dev/mid":    {typ: ext4inspect.CharDev, mode: 0o600, mtime: t1, major: 300, minor: 70000, links: 1},
	})
}

// TestConvertDeviceNameWithNewline: debugfs commands cannot carry a line
// break, so kiln refuses a device node named with one (its documented
// limitation) instead of building something else.
func TestConvertDeviceNameWithNewline(t *testing.T) {
	l := layerTar(t,
		tDir("dev", 0o755, t1),
		tDevice("dev/bad\nname", tar.TypeChar, 1, 3, 0o666, t1),
	)
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: l}}})
	ref := mustPush(t, "nldev:v1", img)
	dir := t.TempDir()
	msg := convertFails(t, ref, filepath.Join(dir, "rootfs.ext4"), filepath.Join(dir, "cache"))
	assertError(t, msg, ref, `bad\nname`, "line break")
}

// TestConvertSourcesAgree converts the edge-case image from an OCI layout,
// a docker save archive and the registry: same chain ID, same bytes.
func TestConvertSourcesAgree(t *testing.T) {
	spec := edgeImage(t)
	img := mustBuild(t, spec)
	dir := t.TempDir()
	layoutDir := filepath.Join(dir, "layout")
	if err := testimage.WriteLayout(layoutDir, "v1", img); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "image.tar")
	if err := testimage.WriteDockerArchive(archive, "edge:v1", spec); err != nil {
		t.Fatal(err)
	}
	ref := mustPush(t, "edge-sources:v1", img)

	sums := map[string]string{}
	chains := map[string]string{}
	for i, src := range []string{"oci:" + layoutDir + ":v1", "docker-archive:" + archive, ref} {
		out := filepath.Join(dir, fmt.Sprintf("out%d.ext4", i))
		s := convert(t, src, out, filepath.Join(dir, fmt.Sprintf("cache%d", i)))
		sums[src], chains[src] = fileSHA(t, out), s.ChainID
		if i == 0 {
			fsck(t, out)
		}
	}
	if len(unique(sums)) != 1 || len(unique(chains)) != 1 {
		t.Errorf("sources disagree:\nsha256 %q\nchain IDs %q", sums, chains)
	}
}

func unique(m map[string]string) map[string]bool {
	out := map[string]bool{}
	for _, v := range m {
		out[v] = true
	}
	return out
}

func platformImage(t *testing.T, arch string) v1.Image {
	return mustBuild(t, testimage.Image{
		Layers: []testimage.Layer{{Tar: layerTar(t, tFile("arch", 0o644, t1, arch))}},
		Arch:   arch,
	})
}

// TestConvertPlatform selects from a multi-platform index.
func TestConvertPlatform(t *testing.T) {
	amd, arm := platformImage(t, "amd64"), platformImage(t, "arm64")
	ref := reg.Host + "/multi:v1"
	if err := testimage.PushIndex(ref, map[string]v1.Image{"linux/amd64": amd, "linux/arm64": arm}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	check := func(s *summary, out string, img v1.Image, arch string) {
		t.Helper()
		if s.Platform != "linux/"+arch || s.Digest != mustDigest(t, img) {
			t.Errorf("platform %s digest %s, want linux/%s %s", s.Platform, s.Digest, arch, mustDigest(t, img))
		}
		sum := sha256.Sum256([]byte(arch))
		if e := inspect(t, out).Entries["/arch"]; e == nil || e.SHA256 != hex.EncodeToString(sum[:]) {
			t.Errorf("/arch of the %s image does not say %s", s.Platform, arch)
		}
	}
	if runtime.GOARCH == "amd64" {
		out := filepath.Join(dir, "default.ext4")
		check(convert(t, ref, out, cache), out, amd, "amd64")
	} else {
		t.Logf("host is %s: not checking the default platform", runtime.GOARCH)
	}
	out := filepath.Join(dir, "arm64.ext4")
	check(convert(t, ref, out, cache, "--platform", "linux/arm64"), out, arm, "arm64")

	msg := convertFails(t, ref, filepath.Join(dir, "s390x.ext4"), cache, "--platform", "linux/s390x")
	assertError(t, msg, ref, "linux/s390x", "linux/amd64", "linux/arm64")
}

// TestConvertForeignPlatform: an image made only for another platform than
// the host's is refused without --platform, from every kind of source and
// whether it is an index or a single manifest, with an error naming the
// image and the platform it offers; --platform selects it.
func TestConvertForeignPlatform(t *testing.T) {
	foreign := "arm64"
	if runtime.GOARCH == "arm64" {
		foreign = "amd64"
	}
	want := "linux/" + foreign
	spec := testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("arch", 0o644, t1, foreign))}}, Arch: foreign}
	img := mustBuild(t, spec)
	dir := t.TempDir()
	indexLayout, plainLayout := filepath.Join(dir, "index-layout"), filepath.Join(dir, "plain-layout")
	if err := testimage.WriteIndexLayout(indexLayout, "v1", map[string]v1.Image{want: img}); err != nil {
		t.Fatal(err)
	}
	if err := testimage.WriteLayout(plainLayout, "v1", img); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "image.tar")
	if err := testimage.WriteDockerArchive(archive, "foreign:v1", spec); err != nil {
		t.Fatal(err)
	}
	indexRef := reg.Host + "/foreign-index:v1"
	if err := testimage.PushIndex(indexRef, map[string]v1.Image{want: img}); err != nil {
		t.Fatal(err)
	}
	sources := map[string]string{
		"layout index":    "oci:" + indexLayout + ":v1",
		"layout manifest": "oci:" + plainLayout + ":v1",
		"docker archive":  "docker-archive:" + archive,
		"registry index":  indexRef,
		"registry image":  mustPush(t, "foreign-image:v1", img),
	}
	for what, src := range sources {
		what = strings.ReplaceAll(what, " ", "-")
		t.Run(what, func(t *testing.T) {
			cache := filepath.Join(dir, "cache-"+what)
			msg := convertFails(t, src, filepath.Join(dir, "refused-"+what+".ext4"), cache)
			assertError(t, msg, src, want, "--platform")
			out := filepath.Join(dir, what+".ext4")
			s := convert(t, src, out, cache, "--platform", want)
			if s.Platform != want {
				t.Errorf("converted as %s, want %s", s.Platform, want)
			}
			sum := sha256.Sum256([]byte(foreign))
			if e := inspect(t, out).Entries["/arch"]; e == nil || e.SHA256 != hex.EncodeToString(sum[:]) {
				t.Errorf("/arch does not say %s", foreign)
			}
		})
	}
}

// TestConvertEmptyIndex: an index without manifests is an error, whether
// it is an OCI layout's index.json, an index tagged in a layout, or an
// index in a registry.
func TestConvertEmptyIndex(t *testing.T) {
	dir := t.TempDir()
	top := filepath.Join(dir, "top")
	if _, err := layout.Write(top, empty.Index); err != nil {
		t.Fatal(err)
	}
	nested := filepath.Join(dir, "nested")
	p, err := layout.Write(nested, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	emptyIdx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	// Nothing else creates blobs/sha256 for a layout without images.
	if err := os.MkdirAll(filepath.Join(nested, "blobs", "sha256"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := p.AppendIndex(emptyIdx, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/empty-index:v1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, emptyIdx); err != nil {
		t.Fatal(err)
	}
	for i, src := range []string{"oci:" + top, "oci:" + nested + ":v1", ref} {
		msg := convertFails(t, src, filepath.Join(dir, fmt.Sprintf("out%d.ext4", i)), filepath.Join(dir, "cache"))
		assertError(t, msg, src, "empty")
	}
}

// TestConvertDeterministicUnprivileged converts the minbase image as root
// and as nobody, with separate caches: the bytes must be the same.
func TestConvertDeterministicUnprivileged(t *testing.T) {
	needRoot(t, "running kiln as another user")
	ref := minbaseRef(t)
	rootDir := t.TempDir()
	rootOut := filepath.Join(rootDir, "rootfs.ext4")
	convert(t, ref, rootOut, filepath.Join(rootDir, "cache"))

	const nobody = 65534
	dir := sharedTempDir(t, "kiln-nobody-")
	for _, d := range []string{"home", "cache", "out", "docker"} {
		p := filepath.Join(dir, d)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, nobody, nobody); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(dir, "out", "rootfs.ext4")
	res := kiln(t, run{
		args: convertArgs(ref, out, filepath.Join(dir, "cache")),
		// An ordinary user's PATH, without the sbin directories that
		// hold e2fsprogs.
		env: map[string]string{"HOME": filepath.Join(dir, "home"), "DOCKER_CONFIG": filepath.Join(dir, "docker"),
			"PATH": "/usr/local/bin:/usr/bin:/bin"},
		dir:  filepath.Join(dir, "home"),
		cred: &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{}},
	})
	if res.err != nil {
		t.Fatalf("kiln as nobody: %v\n%s", res.err, res.stderr)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(out, &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != nobody {
		t.Errorf("output owned by %d, want %d: kiln did not run as nobody", st.Uid, nobody)
	}
	if a, b := fileSHA(t, rootOut), fileSHA(t, out); a != b {
		t.Errorf("root built %s, nobody built %s", a, b)
	}
}

// TestConvertCache: converting again is served from the cache, fetches no
// layer blob, and gives the same bytes.
func TestConvertCache(t *testing.T) {
	ref := minbaseRef(t)
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	first := filepath.Join(dir, "first.ext4")
	s1 := convert(t, ref, first, cache)
	if s1.Cached {
		t.Errorf("first conversion says cached")
	}
	n := len(reg.Requests())
	second := filepath.Join(dir, "second.ext4")
	s2 := convert(t, ref, second, cache)
	if !s2.Cached {
		t.Errorf("second conversion is not cached: %+v", *s2)
	}
	fetched := blobFetches("minbase", n)
	layers := map[string]bool{}
	for _, d := range layerDigests(t, minbase.img) {
		layers[d] = true
	}
	for _, d := range fetched {
		if layers[d] {
			t.Errorf("second conversion fetched layer blob %s again", d)
		}
	}
	if len(fetched) > 0 {
		// Resolving the tag reads the manifest and config every time.
		t.Logf("second conversion fetched these (non-layer) blobs: %v", fetched)
	}
	if a, b := fileSHA(t, first), fileSHA(t, second); a != b {
		t.Errorf("cached copy differs: %s vs %s", a, b)
	}
	// Converting over an existing output replaces it.
	third := convert(t, ref, first, cache)
	if !third.Cached || fileSHA(t, first) != fileSHA(t, second) {
		t.Errorf("converting over an existing output: cached %v", third.Cached)
	}
}

// TestConvertInterrupted kills kiln mid-way: the output must not exist, the
// cache must hold no broken image, and the next run must work.
func TestConvertInterrupted(t *testing.T) {
	ref := minbaseRef(t)
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	out := filepath.Join(dir, "out", "rootfs.ext4")
	if err := os.Mkdir(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	// Kill points: early (resolving, fetching), as soon as an ext4 file
	// shows up in the cache (building), as soon as anything shows up
	// next to the output (writing it).
	hasExt4 := func() bool {
		found := false
		filepath.WalkDir(cache, func(p string, d fs.DirEntry, err error) error { //nolint:errcheck // racing with kiln
			if err == nil && !d.IsDir() && strings.HasSuffix(p, ".ext4") {
				found = true
			}
			return nil
		})
		return found
	}
	outDirUsed := func() bool {
		ents, _ := os.ReadDir(filepath.Dir(out))
		return len(ents) > 0
	}
	started := time.Now()
	killPoints := []struct {
		name string
		now  func() bool
	}{
		{"after 300ms", func() bool { return time.Since(started) > 300*time.Millisecond }},
		{"while building", hasExt4},
		{"while writing the output", outDirUsed},
	}
	for _, kp := range killPoints {
		cmd := exec.Command(kilnBin, convertArgs(ref, out, cache)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "DOCKER_CONFIG=" + t.TempDir()}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		started = time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var err error
	wait:
		for {
			select {
			case err = <-done:
				break wait
			default:
			}
			if kp.now() {
				// SIGKILL kiln, then whatever it started (mke2fs, debugfs).
				cmd.Process.Kill() //nolint:errcheck // it may have finished
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				err = <-done
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		t.Logf("%s (%v): %v", kp.name, time.Since(started).Round(time.Millisecond), errOr(err, "kiln finished first"))
		if err == nil {
			os.Remove(out)
			continue
		}
		// No broken image in the cache (next to each, a record of its
		// source for kiln cache).
		ents, _ := filepath.Glob(filepath.Join(cache, "rootfs", "*.ext4"))
		for _, e := range ents {
			fsck(t, e)
		}
		// The output appears whole or not at all: it is copied into an
		// unnamed file that gets its name once complete.
		if _, err := os.Stat(out); err == nil {
			if len(ents) != 1 || fileSHA(t, out) != fileSHA(t, ents[0]) {
				t.Errorf("%s exists after the kill but is not the complete image", out)
			}
			os.Remove(out)
		}
		leftovers, _ := os.ReadDir(filepath.Dir(out))
		for _, e := range leftovers {
			t.Logf("left in the output directory: %s", e.Name())
			os.Remove(filepath.Join(filepath.Dir(out), e.Name()))
		}
	}
	s := convert(t, ref, out, cache)
	fsck(t, out)
	if s.Cached {
		t.Logf("the interrupted run had already published the image")
	}
	// The next run cleans the work directories of interrupted ones.
	if ents, _ := os.ReadDir(filepath.Join(cache, "tmp")); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("work directories left in the cache after a clean run: %v", names)
	}
}

// TestConvertSize: an explicit size is the filesystem size; a size the
// content does not fit is an error.
func TestConvertSize(t *testing.T) {
	dir := t.TempDir()
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("hello", 0o644, t1, "hello"))}}})
	ref := mustPush(t, "small:v1", img)
	out := filepath.Join(dir, "2g.ext4")
	s := convert(t, ref, out, filepath.Join(dir, "cache"), "--size", "2G")
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	im := inspect(t, out)
	if fi.Size() != 2<<30 || s.Size != 2<<30 || im.BlockSize*im.BlockCount != 2<<30 {
		t.Errorf("file %d bytes, summary %d, filesystem %d blocks of %d; want 2 GiB", fi.Size(), s.Size, im.BlockCount, im.BlockSize)
	}
	fsck(t, out)

	ref = minbaseRef(t)
	msg := convertFails(t, ref, filepath.Join(dir, "4m.ext4"), filepath.Join(dir, "cache"), "--size", "4M")
	assertError(t, msg, ref, "does not fit")
}

// TestConvertCredentials: a registry that wants basic auth, with the
// credentials in a docker config.json.
func TestConvertCredentials(t *testing.T) {
	authReg, err := testregistry.StartWith(testregistry.Options{User: "kiln-user", Password: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	defer authReg.Close()
	ref := authReg.Host + "/private:v1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("secret", 0o600, t1, "s"))}}})
	if err := remote.Write(r, img, remote.WithAuth(&authn.Basic{Username: "kiln-user", Password: "s3cret"})); err != nil {
		t.Fatal(err)
	}
	dockerConfig := func(user, pass string) string {
		d := t.TempDir()
		cfg, _ := json.Marshal(map[string]any{"auths": map[string]any{
			authReg.Host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))},
		}})
		if err := os.WriteFile(filepath.Join(d, "config.json"), cfg, 0o600); err != nil {
			t.Fatal(err)
		}
		return d
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "rootfs.ext4")
	res := kiln(t, run{args: convertArgs(ref, out, filepath.Join(dir, "cache")), env: map[string]string{"DOCKER_CONFIG": dockerConfig("kiln-user", "s3cret")}})
	if res.err != nil {
		t.Fatalf("with credentials: %v\n%s", res.err, res.stderr)
	}
	fsck(t, out)

	for what, cfg := range map[string]string{"no credentials": t.TempDir(), "a wrong password": dockerConfig("kiln-user", "wrong")} {
		out := filepath.Join(dir, "noauth.ext4")
		res := kiln(t, run{args: convertArgs(ref, out, filepath.Join(dir, "cache2")), env: map[string]string{"DOCKER_CONFIG": cfg}})
		if res.err == nil {
			t.Errorf("with %s: kiln succeeded", what)
			continue
		}
		t.Logf("with %s: %s", what, strings.TrimSpace(res.stderr))
		assertNotExist(t, out)
		low := strings.ToLower(strings.ReplaceAll(res.stderr, ref, ""))
		if !strings.Contains(low, "unauthorized") && !strings.Contains(low, "401") && !strings.Contains(low, "authentication required") {
			t.Errorf("with %s: the error does not say authentication failed:\n%s", what, res.stderr)
		}
		assertError(t, res.stderr, ref)
	}
}

// nonLoopbackIPv4 returns an IPv4 address of an interface that is up and
// not loopback, a private (RFC 1918) one if there is one: for those
// go-containerregistry itself would fall back to plain HTTP, so only
// kiln's own policy stands in the way.
func nonLoopbackIPv4() (string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	var found []net.IP
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
				found = append(found, ipn.IP)
			}
		}
	}
	for _, ip := range found {
		if ip.IsPrivate() {
			return ip.String(), nil
		}
	}
	if len(found) > 0 {
		return found[0].String(), nil
	}
	return "", errors.New("no non-loopback IPv4 address")
}

// TestConvertPlainHTTPPolicy: a registry on a non-loopback address is not
// spoken to over plain HTTP unless named with --insecure-registry.
func TestConvertPlainHTTPPolicy(t *testing.T) {
	ip, err := nonLoopbackIPv4()
	if err != nil {
		t.Skipf("needs a non-loopback IPv4 address to serve the registry on: %v", err)
	}
	host, err := reg.Listen(ip + ":0")
	if err != nil {
		t.Skipf("cannot listen on %s: %v", ip, err)
	}
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("hello", 0o644, t1, "plain"))}}})
	mustPush(t, "plain:v1", img) // the same registry, through loopback
	ref := host + "/plain:v1"
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	served := func(n int) int {
		c := 0
		for _, q := range reg.Requests()[n:] {
			if q.Host == host {
				c++
			}
		}
		return c
	}

	private := net.ParseIP(ip).IsPrivate()
	t.Logf("registry on %s (private address: %v)", host, private)
	for _, flags := range [][]string{nil, {"--insecure-registry", "127.0.0.1:1"}} {
		n := len(reg.Requests())
		out := filepath.Join(dir, "refused.ext4")
		msg := convertFails(t, ref, out, cache, flags...)
		if private {
			assertError(t, msg, ref, "plain HTTP")
		} else {
			assertError(t, msg, ref)
		}
		if c := served(n); c != 0 {
			t.Errorf("with flags %q: %d plain HTTP requests reached %s", flags, c, host)
		}
	}

	n := len(reg.Requests())
	out := filepath.Join(dir, "allowed.ext4")
	convert(t, ref, out, cache, "--insecure-registry", host)
	fsck(t, out)
	if served(n) == 0 {
		t.Errorf("no request reached %s", host)
	}
}

// TestConvertHostsToml: a containerd hosts.toml makes the test registry a
// mirror of a registry that does not exist; kiln pulls through it.
func TestConvertHostsToml(t *testing.T) {
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("hello", 0o644, epoch2020, "from the mirror\n"))}}})
	mustPush(t, "mirrored/app:v1", img)
	hosts := t.TempDir()
	dir := filepath.Join(hosts, "registry.invalid")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"https://registry.invalid\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.Host)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	convert(t, "registry.invalid/mirrored/app:v1", out, t.TempDir(), "--hosts-dir", hosts)
	fsck(t, out)
	if e := inspect(t, out).Entries["/hello"]; e == nil || e.Size != int64(len("from the mirror\n")) {
		t.Errorf("the mirror's image was not converted: %+v", e)
	}
	msg := convertFails(t, "registry.invalid/mirrored/app:v1", filepath.Join(t.TempDir(), "x.ext4"), t.TempDir(), "--hosts-dir", "")
	if !strings.Contains(msg, "registry.invalid") {
		t.Errorf("without the mirror the error should name the registry: %s", msg)
	}
}

// TestWritersAgree converts the suite's images (the edge-case images,
// busybox and Debian minbase, with kiln's guest pieces injected) with
// kiln's own writer and with e2fsprogs: both outputs pass e2fsck and hold
// the same tree, entry by entry, as debugfs reads them.
func TestWritersAgree(t *testing.T) {
	for name, ref := range map[string]func() string{
		"edge":            func() string { return mustPush(t, "writers/edge:v1", mustBuild(t, edgeImage(t))) },
		"containerd-edge": func() string { return mustPush(t, "writers/ctd-edge:v1", mustBuild(t, ctdEdgeImage(t, true))) },
		"busybox":         func() string { return mustPush(t, "writers/busybox:v1", busyboxImage(t, v1.Config{})) },
		"minbase":         func() string { return minbaseRef(t) },
	} {
		t.Run(name, func(t *testing.T) {
			src := ref()
			dir := t.TempDir()
			var desc [2]map[string]string
			for i, writer := range []string{"kiln", "e2fsprogs"} {
				out := filepath.Join(dir, writer+".ext4")
				convert(t, src, out, filepath.Join(dir, "cache-"+writer), "--writer", writer, "--inject", "init")
				fsck(t, out)
				desc[i] = ext4test.Describe(t, out)
			}
			for _, p := range slices.Sorted(maps.Keys(desc[1])) {
				if got, want := desc[0][p], desc[1][p]; got != want {
					t.Errorf("%s:\n  kiln:      %q\n  e2fsprogs: %q", p, got, want)
				}
			}
			for p := range desc[0] {
				if _, ok := desc[1][p]; !ok {
					t.Errorf("%s: only in kiln's image", p)
				}
			}
			t.Logf("%d entries agree", len(desc[1]))
		})
	}
}
