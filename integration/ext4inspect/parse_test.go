package ext4inspect

import (
	"bytes"
	"testing"
	"time"
)

// captured is the stdout of debugfs 1.47.0 -f on a script of
//
//	ls -p <2>, stat <17>, stat <12>, stat <13>, stat <18>, stat <14>
//
// for an image made with mke2fs -d from a tree with odd names, a new-style
// device number, a fast symlink whose target holds a quote, a backslash and
// a newline, and a file given (with debugfs sif) a 32-bit uid, a pre-1970
// mtime, a post-2038 atime, a ctime with nanoseconds and these xattrs:
// user.foo "bar", trusted.bin ff fe, user.esc with C escapes, a 50-byte
// user.long (which stat leaves out), an empty user.empty and a binary
// security.capability.
const captured = "" +
	"debugfs: ls -p <2>\n" +
	"/2/040755/0/0/.//\n" +
	"/2/040755/0/0/..//\n" +
	"/11/040700/0/0/lost+found//\n" +
	"/12/060644/0/0/blk/0/\n" +
	"/13/020644/0/0/chr/0/\n" +
	"/14/041777/0/0/dir//\n" +
	"/15/010644/0/0/ff/0/\n" +
	"/16/100644/0/0/nl\n" +
	"name/1/\n" +
	"/17/106755/-294967296/100000/sp ace\"q\\b/5/\n" +
	"/18/120777/0/0/weird/5/\n" +
	"/19/100644/0/0/\xff\xfe/1/\n" +
	"\n" +
	"debugfs: stat <17>\n" +
	"Inode: 17   Type: regular    Mode:  06755   Flags: 0x80000\n" +
	"Generation: 0    Version: 0x00000000:00000000\n" +
	"User: -294967296   Group: 100000   Project:     0   Size: 5\n" +
	"File ACL: 1621\n" +
	"Links: 1   Blockcount: 4\n" +
	"Fragment:  Address: 0    Number: 0    Size: 0\n" +
	" ctime: 0x00000005:1d6f3454 -- Thu Jan  1 00:00:05 1970\n" +
	" atime: 0xf4865700:00000001 -- Fri Jan  1 00:00:00 2100\n" +
	" mtime: 0xfe1ed680:00000004 -- Wed Jan  1 00:42:40 1969\n" +
	"crtime: 0x6b07f2b0:00000000 -- Thu Nov 26 08:49:52 2026\n" +
	"Size of extra inode fields: 32\n" +
	"Extended attributes:\n" +
	"  user.foo (3) = \"bar\"\n" +
	"  trusted.bin (2) = ff fe \n" +
	"  user.esc (20) = \"a\\\"b\\\\c\\tdefghijklmnopq\"\n" +
	"  user.long (50)\n" +
	"  user.empty (0)\n" +
	"  security.capability (20) = 01 00 00 02 00 20 00 00 00 00 00 00 00 00 00 00 00 00 00 00 \n" +
	"Inode checksum: 0x33188021\n" +
	"EXTENTS:\n" +
	"(0):1620\n" +
	"debugfs: stat <12>\n" +
	"Inode: 12   Type: block special    Mode:  0644   Flags: 0x0\n" +
	"Generation: 0    Version: 0x00000000:00000000\n" +
	"User:     0   Group:     0   Project:     0   Size: 0\n" +
	"File ACL: 0\n" +
	"Links: 1   Blockcount: 0\n" +
	"Fragment:  Address: 0    Number: 0    Size: 0\n" +
	" ctime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" atime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" mtime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	"crtime: 0x6b07f2b0:00000000 -- Thu Nov 26 08:49:52 2026\n" +
	"Size of extra inode fields: 32\n" +
	"Inode checksum: 0x8e1ff0ae\n" +
	"(New-style) Device major/minor number: 259:65536 (hex 103:10000)\n" +
	"debugfs: stat <13>\n" +
	"Inode: 13   Type: character special    Mode:  0644   Flags: 0x0\n" +
	"Generation: 0    Version: 0x00000000:00000000\n" +
	"User:     0   Group:     0   Project:     0   Size: 0\n" +
	"File ACL: 0\n" +
	"Links: 1   Blockcount: 0\n" +
	"Fragment:  Address: 0    Number: 0    Size: 0\n" +
	" ctime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" atime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" mtime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	"crtime: 0x6b07f2b0:00000000 -- Thu Nov 26 08:49:52 2026\n" +
	"Size of extra inode fields: 32\n" +
	"Inode checksum: 0xb8e3df2a\n" +
	"Device major/minor number: 01:03 (hex 01:03)\n" +
	"debugfs: stat <18>\n" +
	"Inode: 18   Type: symlink    Mode:  0777   Flags: 0x0\n" +
	"Generation: 0    Version: 0x00000000:00000000\n" +
	"User:     0   Group:     0   Project:     0   Size: 5\n" +
	"File ACL: 0\n" +
	"Links: 1   Blockcount: 0\n" +
	"Fragment:  Address: 0    Number: 0    Size: 0\n" +
	" ctime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" atime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" mtime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	"crtime: 0x6b07f2b0:00000000 -- Thu Nov 26 08:49:52 2026\n" +
	"Size of extra inode fields: 32\n" +
	"Inode checksum: 0x59fed360\n" +
	"Fast link dest: \"q\"\\\n" +
	"z\"\n" +
	"debugfs: stat <14>\n" +
	"Inode: 14   Type: directory    Mode:  01777   Flags: 0x80000\n" +
	"Generation: 0    Version: 0x00000000:00000000\n" +
	"User:     0   Group:     0   Project:     0   Size: 1024\n" +
	"File ACL: 0\n" +
	"Links: 2   Blockcount: 2\n" +
	"Fragment:  Address: 0    Number: 0    Size: 0\n" +
	" ctime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" atime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	" mtime: 0x6b07f2ae:00000000 -- Thu Nov 26 08:49:50 2026\n" +
	"crtime: 0x6b07f2b0:00000000 -- Thu Nov 26 08:49:52 2026\n" +
	"Size of extra inode fields: 32\n" +
	"Inode checksum: 0x239b1aa5\n" +
	"EXTENTS:\n" +
	"(0):1618\n"

var capturedCmds = []string{"ls -p <2>", "stat <17>", "stat <12>", "stat <13>", "stat <18>", "stat <14>"}

func capturedSections(t *testing.T) []string {
	t.Helper()
	secs, err := splitSections(captured, capturedCmds)
	if err != nil {
		t.Fatal(err)
	}
	return secs
}

func TestParseLs(t *testing.T) {
	ents, err := parseLs(capturedSections(t)[0])
	if err != nil {
		t.Fatal(err)
	}
	want := []dirEntry{
		{11, 0o40700, 0, 0, "lost+found", -1},
		{12, 0o60644, 0, 0, "blk", 0},
		{13, 0o20644, 0, 0, "chr", 0},
		{14, 0o41777, 0, 0, "dir", -1},
		{15, 0o10644, 0, 0, "ff", 0},
		{16, 0o100644, 0, 0, "nl\nname", 1},
		{17, 0o106755, 4000000000, 100000, `sp ace"q\b`, 5},
		{18, 0o120777, 0, 0, "weird", 5},
		{19, 0o100644, 0, 0, "\xff\xfe", 1},
	}
	if len(ents) != len(want) {
		t.Fatalf("got %d entries, want %d: %+v", len(ents), len(want), ents)
	}
	for i := range want {
		if ents[i] != want[i] {
			t.Errorf("entry %d: got %+v, want %+v", i, ents[i], want[i])
		}
	}
}

func TestParseLsRejectsGarbage(t *testing.T) {
	if _, err := parseLs("/12/100644/0/0/x/1/\nnot a record\n"); err == nil {
		t.Fatal("no error for garbage")
	}
}

func TestParseStatRegular(t *testing.T) {
	st, err := parseStat(capturedSections(t)[1])
	if err != nil {
		t.Fatal(err)
	}
	if st.Ino != 17 || st.Type != Regular || st.Mode != 0o6755 || st.Size != 5 || st.Links != 1 || st.Blocks != 4 || st.FileACL != 1621 {
		t.Errorf("fields: %+v", st)
	}
	if st.UID != 4000000000 || st.GID != 100000 {
		t.Errorf("owner %d:%d, want 4000000000:100000", st.UID, st.GID)
	}
	if want := time.Unix(-31533440, 1); !st.Mtime.Equal(want) {
		t.Errorf("mtime %v, want %v", st.Mtime, want)
	}
	if want := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC); !st.Atime.Equal(want) {
		t.Errorf("atime %v, want %v", st.Atime, want)
	}
	if want := time.Unix(5, 123456789); !st.Ctime.Equal(want) {
		t.Errorf("ctime %v, want %v", st.Ctime, want)
	}
	wantX := map[string][]byte{
		"user.foo":            []byte("bar"),
		"trusted.bin":         {0xff, 0xfe},
		"user.esc":            []byte("a\"b\\c\tdefghijklmnopq"),
		"user.empty":          {},
		"security.capability": append([]byte{1, 0, 0, 2, 0, 0x20, 0, 0}, make([]byte, 12)...),
	}
	if len(st.Xattrs) != len(wantX) {
		t.Errorf("xattrs %q, want %q", st.Xattrs, wantX)
	}
	for k, v := range wantX {
		if got, ok := st.Xattrs[k]; !ok || !bytes.Equal(got, v) {
			t.Errorf("xattr %s = %q, want %q", k, got, v)
		}
	}
	if len(st.LongXattrs) != 1 || st.LongXattrs["user.long"] != 50 {
		t.Errorf("long xattrs %v, want user.long (50)", st.LongXattrs)
	}
}

func TestParseStatDevices(t *testing.T) {
	secs := capturedSections(t)
	blk, err := parseStat(secs[2])
	if err != nil {
		t.Fatal(err)
	}
	if blk.Type != BlockDev || !blk.HasDevice || blk.Major != 259 || blk.Minor != 65536 {
		t.Errorf("block device: %+v", blk)
	}
	chr, err := parseStat(secs[3])
	if err != nil {
		t.Fatal(err)
	}
	if chr.Type != CharDev || chr.Major != 1 || chr.Minor != 3 || chr.Mode != 0o644 {
		t.Errorf("char device: %+v", chr)
	}
}

func TestParseStatFastLink(t *testing.T) {
	st, err := parseStat(capturedSections(t)[4])
	if err != nil {
		t.Fatal(err)
	}
	if st.Type != Symlink || !st.FastLink || st.Target != "q\"\\\nz" {
		t.Errorf("symlink: fast=%v target=%q", st.FastLink, st.Target)
	}
}

func TestParseStatDir(t *testing.T) {
	st, err := parseStat(capturedSections(t)[5])
	if err != nil {
		t.Fatal(err)
	}
	if st.Type != Dir || st.Mode != 0o1777 || st.Links != 2 {
		t.Errorf("dir: %+v", st)
	}
}

func TestParseStatSmallInode(t *testing.T) {
	// 128-byte inodes have no extra time fields.
	out := "Inode: 12   Type: regular    Mode:  0644   Flags: 0x0\n" +
		"Generation: 0    Version: 0x00000000\n" +
		"User:  1000   Group:  1000   Size: 3\n" +
		"File ACL: 0\n" +
		"Links: 2   Blockcount: 8\n" +
		"Fragment:  Address: 0    Number: 0    Size: 0\n" +
		"ctime: 0x80000000 -- Fri Dec 13 20:45:52 1901\n" +
		"atime: 0x00000001 -- Thu Jan  1 00:00:01 1970\n" +
		"mtime: 0x7fffffff -- Tue Jan 19 03:14:07 2038\n" +
		"BLOCKS:\n(0):1234\nTOTAL: 1\n\n"
	st, err := parseStat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.UID != 1000 || st.Links != 2 || st.Size != 3 {
		t.Errorf("fields: %+v", st)
	}
	if !st.Ctime.Equal(time.Unix(-1<<31, 0)) || !st.Atime.Equal(time.Unix(1, 0)) || !st.Mtime.Equal(time.Unix(1<<31-1, 0)) {
		t.Errorf("times: %v %v %v", st.Ctime, st.Atime, st.Mtime)
	}
}

func TestDecodeTime(t *testing.T) {
	for _, c := range []struct {
		lo, extra uint32
		want      time.Time
	}{
		{0, 0, time.Unix(0, 0)},
		{0xffffffff, 0, time.Unix(-1, 0)},
		{0xfe1ed680, 4, time.Unix(-31533440, 1)},
		{0x80000000, 0, time.Unix(-1<<31, 0)},
		{0x80000000, 1, time.Unix(1<<31, 0)},      // 2038-01-19
		{0xf4865700, 1, time.Unix(4102444800, 0)}, // 2100-01-01
		{0x7fffffff, 3<<0 | 999999999<<2, time.Unix(1<<31-1+3<<32, 999999999)},
	} {
		if got := DecodeTime(c.lo, c.extra); !got.Equal(c.want) {
			t.Errorf("DecodeTime(%#x, %#x) = %v, want %v", c.lo, c.extra, got, c.want)
		}
	}
}

func TestParseXattrLines(t *testing.T) {
	for _, c := range []struct {
		line string
		name string
		val  []byte
		long int
	}{
		{`user.a (3) = "x y"`, "user.a", []byte("x y"), 0},
		{`user.a (3) = "\001\377z"`, "user.a", []byte("\x01\xffz"), 0},
		{`user.b (2) = 00 ff `, "user.b", []byte{0, 0xff}, 0},
		{`user.c (0)`, "user.c", []byte{}, 0},
		{`user.d (400)`, "user.d", nil, 400},
		{`user.e (1) (1) = "q"`, "user.e (1)", []byte("q"), 0},
		{`user.e (1) = x (1) = "q"`, "user.e (1) = x", []byte("q"), 0},
		{`ff fe  (1) = "q"`, "\xff\xfe", []byte("q"), 0},
		{`user.f\" (1) = "\""`, `user.f"`, []byte(`"`), 0},
	} {
		vals, long, err := parseXattrs("  " + c.line + "\nInode checksum: 0x0\n")
		if err != nil {
			t.Errorf("%q: %v", c.line, err)
			continue
		}
		if c.long > 0 {
			if long[c.name] != c.long || len(vals) != 0 {
				t.Errorf("%q: long %v vals %q", c.line, long, vals)
			}
			continue
		}
		if got, ok := vals[c.name]; !ok || !bytes.Equal(got, c.val) || len(vals) != 1 {
			t.Errorf("%q: got %q, want %s=%q", c.line, vals, c.name, c.val)
		}
	}
	if _, _, err := parseXattrs("  user.x (3) = \"ab\"\n"); err == nil {
		t.Error("no error for a value shorter than its length")
	}
}

func TestSplitSectionsEmptyOutput(t *testing.T) {
	out := "debugfs: dump <12> \"/x\"\ndebugfs: stat <13>\nInode: 13\ndebugfs: dump <14> \"/y\"\n"
	secs, err := splitSections(out, []string{`dump <12> "/x"`, "stat <13>", `dump <14> "/y"`})
	if err != nil {
		t.Fatal(err)
	}
	if secs[0] != "" || secs[1] != "Inode: 13\n" || secs[2] != "" {
		t.Errorf("sections %q", secs)
	}
}

func TestParseSuper(t *testing.T) {
	bs, bc, err := parseSuper("Filesystem volume name:   <none>\nBlock count:              524288\nBlock size:               4096\n")
	if err != nil || bs != 4096 || bc != 524288 {
		t.Errorf("got %d %d %v", bs, bc, err)
	}
}
