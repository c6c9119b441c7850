package ext4read_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

// aclXattr encodes a POSIX ACL the way getxattr returns it.
func aclXattr(entries ...[3]uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, uint16(e[0]))
		b = binary.LittleEndian.AppendUint16(b, uint16(e[1]))
		b = binary.LittleEndian.AppendUint32(b, e[2])
	}
	return b
}

var testACL = aclXattr([3]uint32{1, 6, 0xFFFFFFFF}, [3]uint32{2, 4, 1234},
	[3]uint32{4, 4, 0xFFFFFFFF}, [3]uint32{0x10, 4, 0xFFFFFFFF}, [3]uint32{0x20, 0, 0xFFFFFFFF})

var capability = []byte{1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// stageTree writes the tree that the images are made from, with a
// directory ("many") of many entries.
func stageTree(t *testing.T, many int) string {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	ext4test.WriteFile(t, p("empty"), nil, 0o644)
	ext4test.WriteFile(t, p("hello"), []byte("hello\n"), 0o644)
	ext4test.WriteFile(t, p("block"), ext4test.Pattern(4096, 1), 0o600)
	ext4test.WriteFile(t, p("odd"), ext4test.Pattern(5000, 2), 0o4755)
	ext4test.WriteFile(t, p("sg"), ext4test.Pattern(10, 3), 0o2711)
	ext4test.WriteFile(t, p("big"), ext4test.Pattern(3<<20, 4), 0o644)
	ext4test.WriteFile(t, p("sp ace/ünï"), []byte("names"), 0o644)

	// Sparse: a hole, data, a hole, data, and a hole up to the size.
	f, err := os.Create(p("sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{1 << 20, 3<<20 - 10} {
		if _, err := f.WriteAt(ext4test.Pattern(9000, off), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(5 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ext4test.WriteFile(t, p("d/f"), []byte("hello"), 0o640)
	must(t, os.Link(p("d/f"), p("d/hard")))
	ext4test.WriteFile(t, p("d/acl"), nil, 0o640)
	must(t, os.Symlink("short", p("d/fast")))
	must(t, os.Symlink(strings.Repeat("x", 100), p("d/slow")))
	must(t, os.Symlink(strings.Repeat("long/", 190), p("d/long")))
	must(t, unix.Mkfifo(p("d/fifo"), 0o600))
	if os.Geteuid() == 0 {
		must(t, unix.Mknod(p("d/chr"), unix.S_IFCHR|0o620, int(unix.Mkdev(4, 64))))
		must(t, unix.Mknod(p("d/blk"), unix.S_IFBLK|0o660, int(unix.Mkdev(259, 1048575))))
	}
	l, err := net.Listen("unix", p("d/sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	must(t, os.Mkdir(p("tmp"), 0o755))
	must(t, unix.Chmod(p("tmp"), 0o1777))
	for i := range many {
		ext4test.WriteFile(t, p(fmt.Sprintf("many/file-with-a-longer-name-%04d", i)), nil, 0o644)
	}
	ext4test.WriteFile(t, p("a/b/c/d/e/f/leaf"), []byte("deep"), 0o644)
	return dir
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// Times the tests set with debugfs.
const (
	mtimeLo    uint32 = 0x83abfb25 // with epoch bits 1: 2040-01-02 03:04:05 UTC
	mtimeExtra        = 123456789<<2 | 1
	atimeLo           = 0x80000000 // 1901-12-13 20:45:52 UTC, before the epoch
)

var variants = []struct {
	name string
	size string
	args []string
}{
	{"ext4", "64M", nil},
	{"ext4-1k-nocsum", "128M", []string{"-b", "1024", "-O", "^metadata_csum"}},
	{"ext4-128-inodes-meta_bg", "64M", []string{"-I", "128", "-O", "meta_bg,^resize_inode"}},
	{"ext4-32bit", "64M", []string{"-O", "^64bit"}},
	{"ext4-64k", "256M", []string{"-b", "65536", "-N", "8000"}},
	{"ext3-blockmap-1k", "128M", []string{"-t", "ext3", "-b", "1024"}},
	{"ext3-blockmap", "64M", []string{"-t", "ext3"}},
	{"ext2-nofiletype", "64M", []string{"-t", "ext2", "-O", "^filetype,^dir_index"}},
	{"ext4-casefold", "64M", []string{"-O", "casefold"}},
}

func TestMatchesDebugfs(t *testing.T) {
	ext4test.Require(t)
	stage := stageTree(t, 300)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			img := ext4test.Mkfs(t, stage, v.size, v.args...)
			bigInodes := !slicesContain(v.args, "128")
			blockMap := slicesContain(v.args, "ext3") || slicesContain(v.args, "ext2")
			far := edit(t, img, bigInodes, blockMap)
			fsys := ext4test.Open(t, img)
			if !blockMap {
				// The extent tree of /frag has index levels: two with
				// 1 KiB blocks.
				ex := ext4test.Run(t, "debugfs", "-R", "ex /frag", img)
				m := regexp.MustCompile(`(?m)^\s*0/\s*(\d+)`).FindStringSubmatch(ex)
				if want := map[int64]string{1024: "2"}[fsys.BlockSize()]; m == nil || m[1] == "0" || (want != "" && m[1] != want) {
					t.Fatalf("/frag's extent tree is not as deep as expected:\n%.300s", ex)
				}
			}

			compareWithDebugfs(t, img, fsys)

			// Explicit values, on top of the comparison.
			in := lookupInode(t, fsys, "/hello")
			if got := in.Atime; !got.Equal(time.Date(1901, 12, 13, 20, 45, 52, 0, time.UTC)) {
				t.Errorf("atime = %v", got)
			}
			wantM := time.Date(2040, 1, 2, 3, 4, 5, 123456789, time.UTC)
			if !bigInodes {
				wantM = time.Date(1903, 11, 26, 20, 35, 49, 0, time.UTC) // no epoch bits
			}
			if !in.Mtime.Equal(wantM) {
				t.Errorf("mtime = %v, want %v", in.Mtime, wantM)
			}
			if in := lookupInode(t, fsys, "/d/f"); in.UID != 70000 || in.GID != 80000 || in.Links != 2 {
				t.Errorf("d/f: uid %d gid %d links %d", in.UID, in.GID, in.Links)
			}
			if in := lookupInode(t, fsys, "/odd"); in.Mode != 0o4755 {
				t.Errorf("odd: mode %o", in.Mode)
			}
			if in := lookupInode(t, fsys, "/tmp"); in.Mode != 0o1777 || in.Type != ext4read.TypeDir {
				t.Errorf("tmp: mode %o type %v", in.Mode, in.Type)
			}
			if in := lookupInode(t, fsys, "/d/bigdev"); in.Major != 4095 || in.Minor != 1048575 || in.Type != ext4read.TypeCharDev {
				t.Errorf("bigdev: %v %d:%d", in.Type, in.Major, in.Minor)
			}
			if os.Geteuid() == 0 {
				if in := lookupInode(t, fsys, "/d/blk"); in.Major != 259 || in.Minor != 1048575 || in.Type != ext4read.TypeBlockDev {
					t.Errorf("blk: %v %d:%d", in.Type, in.Major, in.Minor)
				}
			}
			x, err := fsys.Xattrs(lookup(t, fsys, "/d/f"))
			must(t, err)
			if !bytes.Equal(x["security.capability"], capability) || !bytes.Equal(x["user.big"], ext4test.Pattern(700, 5)) ||
				!bytes.Equal(x["trusted.bin"], []byte{0, 1, 2, 0}) || string(x["user.small"]) != "v1" || len(x) != 4 {
				t.Errorf("d/f xattrs: %q", x)
			}
			x, err = fsys.Xattrs(lookup(t, fsys, "/d/acl"))
			must(t, err)
			if !bytes.Equal(x["system.posix_acl_access"], testACL) {
				t.Errorf("acl: %x, want %x", x["system.posix_acl_access"], testACL)
			}
			checkFar(t, fsys, far)
			if !blockMap {
				want := append([]byte("start"), make([]byte, 12*fsys.BlockSize()+95)...)
				if got := content(t, fsys, "/prealloc"); !bytes.Equal(got, want) {
					t.Errorf("prealloc: uninitialised extents do not read as zeros")
				}
			}
			for _, name := range []string{"big", "sparse", "odd", "sp ace/ünï"} {
				want, err := os.ReadFile(filepath.Join(stage, name))
				must(t, err)
				if got := content(t, fsys, "/"+name); !bytes.Equal(got, want) {
					t.Errorf("%s: content differs from the staged file", name)
				}
			}
			if got, err := fsys.Readlink(lookup(t, fsys, "/d/long")); err != nil || got != strings.Repeat("long/", 190) {
				t.Errorf("d/long: %q, %v", got, err)
			}
		})
	}
}

// TestHashedDirectory reads big hashed directories, whose index has one
// level with 4 KiB blocks and two with 1 KiB blocks.
func TestHashedDirectory(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	for i := range 5000 {
		ext4test.WriteFile(t, filepath.Join(stage, fmt.Sprintf("many/file-with-a-longer-name-%04d", i)), nil, 0o644)
	}
	for _, bs := range []string{"4096", "1024"} {
		t.Run(bs, func(t *testing.T) {
			img := ext4test.Mkfs(t, stage, "64M", "-b", bs)
			ext4test.Fsck(t, img, "-fyD")
			htree := ext4test.Run(t, "debugfs", "-R", "htree /many", img)
			levels := map[string]string{"4096": "Indirect levels: 0", "1024": "Indirect levels: 1"}[bs]
			if !strings.Contains(htree, "Root node dump") || !strings.Contains(htree, levels) {
				t.Fatalf("/many is not indexed as expected (%s):\n%.500s", levels, htree)
			}
			fsys := ext4test.Open(t, img)
			compareWithDebugfs(t, img, fsys)
			ents, err := fsys.ReadDir(lookup(t, fsys, "/many"))
			if err != nil || len(ents) != 5000 {
				t.Fatalf("many: %d entries, %v", len(ents), err)
			}
			for i, e := range ents {
				if want := fmt.Sprintf("file-with-a-longer-name-%04d", i); e.Name != want || e.Type != ext4read.TypeRegular {
					t.Fatalf("entry %d: %+v, want %s", i, e, want)
				}
			}
		})
	}
}

// TestEAInode reads a value that ext4 keeps in an inode of its own.
func TestEAInode(t *testing.T) {
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "f"), []byte("x"), 0o644)
	img := ext4test.Mkfs(t, stage, "16M", "-O", "ea_inode", "-b", "1024")
	value := ext4test.Pattern(1024, 8) // debugfs stores at most a block
	ext4test.SetXattrs(t, img, "/f", map[string][]byte{"user.big": value, "user.small": []byte("s")})
	if out := ext4test.Run(t, "debugfs", "-R", "stat <13>", img); !strings.Contains(out, "Flags: 0x280000") {
		t.Fatalf("no xattr value inode:\n%s", out)
	}
	fsys := ext4test.Open(t, img)
	x, err := fsys.Xattrs(lookup(t, fsys, "/f"))
	if err != nil || !bytes.Equal(x["user.big"], value) || string(x["user.small"]) != "s" {
		t.Fatalf("xattrs: %d bytes, %q, %v", len(x["user.big"]), x["user.small"], err)
	}
	compareWithDebugfs(t, img, fsys)
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// edit sets what mke2fs -d cannot: times with nanoseconds and epoch
// bits, big device numbers, xattrs (which the host filesystem under the
// staged tree may not take), a file with many extents, a file with a block
// far out (in a triple indirect block with a block map); then indexes the
// directories (e2fsck -D), when the filesystem can. It returns the far
// block's number.
func edit(t *testing.T, img string, bigInodes, blockMap bool) int64 {
	frag := filepath.Join(t.TempDir(), "frag")
	if err := os.WriteFile(frag, ext4test.Pattern(2<<20, 7), 0o644); err != nil {
		t.Fatal(err)
	}
	start := filepath.Join(t.TempDir(), "start")
	if err := os.WriteFile(start, []byte("start"), 0o644); err != nil {
		t.Fatal(err)
	}
	bs := ext4test.Open(t, img).BlockSize()
	far := int64(70000)
	if apb := bs / 4; blockMap {
		far = 12 + apb + apb*apb + 5
	}
	cmds := []string{
		"write " + start + " far",
		fmt.Sprintf("bmap -a /far %d", far),
		fmt.Sprintf("zap_block -f /far -p 0x5a %d", far),
		fmt.Sprintf("sif /far size %d", (far+3)*bs-100),
		fmt.Sprintf("sif /hello mtime %#x", mtimeLo),
		fmt.Sprintf("sif /hello atime %#x", atimeLo),
		"cd /d",
		"mknod bigdev c 1 1",
		"cd /",
		"sif /d/bigdev mode 020644",
		"sif /d/bigdev block[0] 0",
		"sif /d/bigdev block[1] 0xffffffff",
		"write " + frag + " frag",
		"sif /d/f uid 70000",
		"sif /d/f gid 80000",
	}
	if bigInodes {
		cmds = append(cmds, fmt.Sprintf("sif /hello mtime_extra %#x", mtimeExtra), "sif /hello atime_extra 0", "sif /hello ctime_extra 3")
	}
	ext4test.Debugfs(t, img, cmds...)
	ext4test.SetXattrs(t, img, "/d/f", map[string][]byte{
		"user.small": []byte("v1"), "user.big": ext4test.Pattern(700, 5),
		"security.capability": capability, "trusted.bin": {0, 1, 2, 0},
	})
	ext4test.SetXattrs(t, img, "/d/acl", map[string][]byte{"system.posix_acl_access": testACL})
	// Punching every other block leaves enough extents for an extent
	// tree of depth 1 (2 with 1 KiB blocks).
	var punch []string
	for b := int64(1); b < (2<<20)/bs; b += 2 {
		punch = append(punch, fmt.Sprintf("punch /frag %d %d", b, b))
	}
	ext4test.Debugfs(t, img, punch...)
	if !blockMap {
		// Uninitialised extents read as zeros, whatever their blocks
		// hold.
		ext4test.Debugfs(t, img, "write "+start+" prealloc", "fallocate /prealloc 3 9",
			fmt.Sprintf("sif /prealloc size %d", 12*bs+100))
		ext4test.Debugfs(t, img, fmt.Sprintf("zap_block -p 0x5a %d", bmap(t, img, "/prealloc", 4)))
	}
	ext4test.Fsck(t, img, "-fyD")
	return far
}

// checkFar reads around /far's far block: too far out to read whole.
func checkFar(t *testing.T, fsys *ext4read.FS, far int64) {
	t.Helper()
	f, err := fsys.Open(lookup(t, fsys, "/far"))
	must(t, err)
	bs := fsys.BlockSize()
	for _, c := range []struct {
		off  int64
		want []byte
	}{
		{0, []byte("start\x00\x00")},
		{1 << 20, make([]byte, 100)},
		{far*bs - 2, append([]byte{0, 0}, bytes.Repeat([]byte{0x5a}, int(bs))...)},
		{(far + 1) * bs, make([]byte, bs)},
		{f.Size() - 10, make([]byte, 10)},
	} {
		got := make([]byte, len(c.want))
		if _, err := f.ReadAt(got, c.off); err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("far: at %d: %v, content differs", c.off, err)
		}
	}
	if n, err := f.ReadAt(make([]byte, 20), f.Size()-10); n != 10 || err != io.EOF {
		t.Errorf("far: read across the end: %d, %v", n, err)
	}
}

func lookup(t *testing.T, fsys *ext4read.FS, path string) uint32 {
	t.Helper()
	ino, err := fsys.Lookup(path)
	if err != nil {
		t.Fatal(err)
	}
	return ino
}

func lookupInode(t *testing.T, fsys *ext4read.FS, path string) *ext4read.Inode {
	t.Helper()
	in, err := fsys.Inode(lookup(t, fsys, path))
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func content(t *testing.T, fsys *ext4read.FS, path string) []byte {
	t.Helper()
	return contentOf(t, fsys, lookup(t, fsys, path))
}

func contentOf(t *testing.T, fsys *ext4read.FS, ino uint32) []byte {
	t.Helper()
	f, err := fsys.Open(ino)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatalf("inode %d: %v", ino, err)
	}
	if int64(len(b)) != f.Size() {
		t.Fatalf("inode %d: read %d bytes of %d", ino, len(b), f.Size())
	}
	return b
}

// debugfsSections runs read-only debugfs commands and returns each
// command's output.
func debugfsSections(t *testing.T, img string, cmds []string) []string {
	t.Helper()
	script := filepath.Join(t.TempDir(), "cmds")
	must(t, os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o644))
	out := ext4test.Run(t, "debugfs", "-f", script, img)
	parts := strings.Split("\n"+out, "\ndebugfs: ")[1:]
	if len(parts) != len(cmds) {
		t.Fatalf("debugfs answered %d of %d commands:\n%s", len(parts), len(cmds), out)
	}
	for i, p := range parts {
		// Each part starts with the echoed command.
		parts[i] = strings.TrimPrefix(p, cmds[i])
	}
	return parts
}

var (
	reStat   = regexp.MustCompile(`Type: ([a-zA-Z ]+?)\s+Mode:\s+(\d+)\s+Flags: 0x([0-9a-f]+)`)
	reOwner  = regexp.MustCompile(`User:\s+(\d+)\s+Group:\s+(\d+)\s+(?:Project:\s+\d+\s+)?Size: (\d+)`)
	reLinks  = regexp.MustCompile(`Links: (\d+)`)
	reTime   = regexp.MustCompile(`(?m)^\s*([acm])time: 0x([0-9a-f]+)(?::([0-9a-f]+))?`)
	reDev    = regexp.MustCompile(`Device major/minor number: (\d+):(\d+)`)
	reFast   = regexp.MustCompile(`Fast link dest: "(.*)"`)
	reXattr  = regexp.MustCompile(`(?m)^  (\S+) \((\d+)\)`)
	reLsLine = regexp.MustCompile(`(?m)^/(\d+)/\d+/\d+/\d+/(.*)/\d*/$`)
)

var debugfsTypes = map[string]ext4read.Type{
	"regular": ext4read.TypeRegular, "directory": ext4read.TypeDir, "symlink": ext4read.TypeSymlink,
	"FIFO": ext4read.TypeFifo, "character special": ext4read.TypeCharDev,
	"block special": ext4read.TypeBlockDev, "socket": ext4read.TypeSocket,
}

// compareWithDebugfs walks the whole tree and checks every inode's
// metadata, xattrs, content and directory listing against debugfs.
func compareWithDebugfs(t *testing.T, img string, fsys *ext4read.FS) {
	t.Helper()
	inodes := map[uint32]*ext4read.Inode{}
	var order []uint32
	err := fsys.Walk(fsys.Root(), func(path string, in *ext4read.Inode) error {
		if _, ok := inodes[in.Ino]; !ok {
			order = append(order, in.Ino)
		}
		inodes[in.Ino] = in
		return nil
	})
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	dumps := t.TempDir()
	var cmds []string
	for _, ino := range order {
		cmds = append(cmds, fmt.Sprintf("stat <%d>", ino), fmt.Sprintf("ea_list <%d>", ino))
		switch in := inodes[ino]; {
		case in.Type == ext4read.TypeRegular && in.Size == 0:
			// Nothing to compare, and dumping thousands of empty files
			// is what would make the test slow.
			if b := contentOf(t, fsys, ino); len(b) != 0 {
				t.Errorf("inode %d: read %d bytes of an empty file", ino, len(b))
			}
		case in.Type == ext4read.TypeRegular && in.Size > 256<<20:
			// Too large to dump: checkFar reads around its data.
		case in.Type == ext4read.TypeRegular || in.Type == ext4read.TypeSymlink:
			cmds = append(cmds, fmt.Sprintf("dump <%d> %s/%d", ino, dumps, ino))
		case in.Type == ext4read.TypeDir:
			cmds = append(cmds, fmt.Sprintf("ls -p <%d>", ino))
		}
	}
	sections := debugfsSections(t, img, cmds)
	var eaCmds []string
	type eaRef struct {
		ino  uint32
		name string
	}
	var eaRefs []eaRef
	for i := 0; i < len(cmds); i++ {
		var ino uint32
		fmt.Sscanf(cmds[i], "stat <%d>", &ino)
		in, stat, eas := inodes[ino], sections[i], sections[i+1]
		i++
		checkStat(t, in, stat)
		got, err := fsys.Xattrs(ino)
		if err != nil {
			t.Errorf("inode %d: %v", ino, err)
		}
		names := reXattr.FindAllStringSubmatch(eas, -1)
		if len(names) != len(got) {
			t.Errorf("inode %d: %d xattrs, debugfs lists %d:\n%s", ino, len(got), len(names), eas)
		}
		for _, m := range names {
			eaCmds = append(eaCmds, fmt.Sprintf("ea_get -f %s/ea-%d <%d> %s", dumps, len(eaRefs), ino, m[1]))
			eaRefs = append(eaRefs, eaRef{ino, m[1]})
		}
		if i+1 < len(cmds) && !strings.HasPrefix(cmds[i+1], "stat ") {
			i++
			switch in.Type {
			case ext4read.TypeDir:
				checkDir(t, fsys, ino, sections[i])
			case ext4read.TypeRegular:
				checkContent(t, fsys, ino, filepath.Join(dumps, strconv.Itoa(int(ino))))
			case ext4read.TypeSymlink:
				target, err := fsys.Readlink(ino)
				if err != nil {
					t.Errorf("inode %d: %v", ino, err)
				}
				want := ""
				if m := reFast.FindStringSubmatch(stat); m != nil {
					want = m[1]
				} else {
					b, _ := os.ReadFile(filepath.Join(dumps, strconv.Itoa(int(ino))))
					want = string(b)
				}
				if target != want {
					t.Errorf("inode %d: target %q, debugfs says %q", ino, target, want)
				}
			}
		}
	}
	if len(eaCmds) > 0 {
		debugfsSections(t, img, eaCmds)
	}
	for i, ref := range eaRefs {
		want, err := os.ReadFile(filepath.Join(dumps, fmt.Sprintf("ea-%d", i)))
		must(t, err)
		x, _ := fsys.Xattrs(ref.ino)
		got := x[ref.name]
		if strings.HasPrefix(ref.name, "system.posix_acl_") {
			got = debugfsACL(got)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("inode %d: xattr %s = %q, debugfs says %q", ref.ino, ref.name, got, want)
		}
	}
}

// debugfsACL rewrites an ACL as debugfs shows it: with id 0, not -1, in
// entries that have no id.
func debugfsACL(b []byte) []byte {
	b = append([]byte{}, b...)
	for off := 4; off+8 <= len(b); off += 8 {
		if binary.LittleEndian.Uint32(b[off+4:]) == 0xFFFFFFFF {
			binary.LittleEndian.PutUint32(b[off+4:], 0)
		}
	}
	return b
}

func checkStat(t *testing.T, in *ext4read.Inode, stat string) {
	t.Helper()
	m := reStat.FindStringSubmatch(stat)
	o := reOwner.FindStringSubmatch(stat)
	l := reLinks.FindStringSubmatch(stat)
	if m == nil || o == nil || l == nil {
		t.Errorf("inode %d: cannot parse debugfs stat:\n%s", in.Ino, stat)
		return
	}
	mode, _ := strconv.ParseUint(m[2], 8, 32)
	flags, _ := strconv.ParseUint(m[3], 16, 32)
	want := fmt.Sprintf("%v %o %#x %s:%s %s links %s", debugfsTypes[m[1]], mode&0o7777, flags, o[1], o[2], o[3], l[1])
	got := fmt.Sprintf("%v %o %#x %d:%d %d links %d", in.Type, in.Mode, in.Flags, in.UID, in.GID, in.Size, in.Links)
	if in.Type != ext4read.TypeRegular && in.Type != ext4read.TypeDir && in.Type != ext4read.TypeSymlink {
		want, got = strings.Replace(want, " "+o[3]+" ", " ", 1), strings.Replace(got, fmt.Sprintf(" %d ", in.Size), " ", 1)
	}
	if got != want {
		t.Errorf("inode %d: %s, debugfs says %s", in.Ino, got, want)
	}
	for _, tm := range reTime.FindAllStringSubmatch(stat, -1) {
		lo, _ := strconv.ParseUint(tm[2], 16, 32)
		sec, nsec := int64(int32(lo)), int64(0)
		if tm[3] != "" {
			extra, _ := strconv.ParseUint(tm[3], 16, 32)
			sec += int64(extra&3) << 32
			nsec = int64(extra >> 2)
		}
		want := time.Unix(sec, nsec)
		got := map[string]time.Time{"a": in.Atime, "c": in.Ctime, "m": in.Mtime}[tm[1]]
		if !got.Equal(want) {
			t.Errorf("inode %d: %stime %v, debugfs says %v", in.Ino, tm[1], got, want)
		}
	}
	if d := reDev.FindStringSubmatch(stat); d != nil {
		major, _ := strconv.Atoi(d[1])
		minor, _ := strconv.Atoi(d[2])
		if in.Major != uint32(major) || in.Minor != uint32(minor) {
			t.Errorf("inode %d: device %d:%d, debugfs says %s:%s", in.Ino, in.Major, in.Minor, d[1], d[2])
		}
	}
}

func checkDir(t *testing.T, fsys *ext4read.FS, ino uint32, ls string) {
	t.Helper()
	ents, err := fsys.ReadDir(ino)
	if err != nil {
		t.Errorf("inode %d: %v", ino, err)
		return
	}
	var got, want []string
	for _, e := range ents {
		got = append(got, fmt.Sprintf("%s=%d", e.Name, e.Ino))
	}
	for _, m := range reLsLine.FindAllStringSubmatch(ls, -1) {
		if m[2] != "." && m[2] != ".." && m[1] != "0" {
			want = append(want, fmt.Sprintf("%s=%s", m[2], m[1]))
		}
	}
	sort.Strings(want)
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("directory %d: %d entries %.200v, debugfs lists %d %.200v", ino, len(got), got, len(want), want)
	}
}

func checkContent(t *testing.T, fsys *ext4read.FS, ino uint32, dump string) {
	t.Helper()
	want, err := os.ReadFile(dump)
	if err != nil {
		t.Errorf("inode %d: debugfs dump: %v", ino, err)
		return
	}
	f, err := fsys.Open(ino)
	if err != nil {
		t.Errorf("inode %d: %v", ino, err)
		return
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Errorf("inode %d: %v", ino, err)
		return
	}
	if got, w := h.Sum(nil), sha256.Sum256(want); !bytes.Equal(got, w[:]) {
		t.Errorf("inode %d: content differs from debugfs dump (%d bytes)", ino, len(want))
	}
}

func TestLookup(t *testing.T) {
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "a/b"), []byte("x"), 0o644)
	must(t, os.Symlink("a", filepath.Join(stage, "link")))
	fsys := ext4test.Open(t, ext4test.Mkfs(t, stage, "8M"))
	for _, p := range []string{"", "/", ".", "/a/b", "a/./b/", "//a//b"} {
		if _, err := fsys.Lookup(p); err != nil {
			t.Errorf("Lookup(%q): %v", p, err)
		}
	}
	for _, p := range []string{"/missing", "/a/missing", "/a/b/c", "/link/b", "/a/../a"} {
		_, err := fsys.Lookup(p)
		if err == nil {
			t.Errorf("Lookup(%q) succeeded", p)
		}
		if strings.Contains(p, "missing") && !errors.Is(err, iofs.ErrNotExist) {
			t.Errorf("Lookup(%q): %v, want fs.ErrNotExist", p, err)
		}
	}
}
