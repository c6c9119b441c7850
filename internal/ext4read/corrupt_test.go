package ext4read_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

// readEverything walks the image and reads every file, symlink, xattr
// set and directory, returning the first error, named by path.
func readEverything(fsys *ext4read.FS) error {
	return fsys.Walk(fsys.Root(), func(path string, in *ext4read.Inode) error {
		if _, err := fsys.Xattrs(in.Ino); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		switch in.Type {
		case ext4read.TypeRegular:
			f, err := fsys.Open(in.Ino)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if _, err := io.CopyN(io.Discard, f, min(in.Size, 1<<20)); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		case ext4read.TypeSymlink:
			if _, err := fsys.Readlink(in.Ino); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		}
		return nil
	})
}

var reImap = regexp.MustCompile(`located at block (\d+), offset 0x([0-9a-f]+)`)

// inodeOffset returns where inode path is in the image.
func inodeOffset(t *testing.T, img, path string, bs int64) int64 {
	t.Helper()
	m := reImap.FindStringSubmatch(ext4test.Run(t, "debugfs", "-R", "imap "+path, img))
	if m == nil {
		t.Fatalf("imap %s failed", path)
	}
	blk, _ := strconv.ParseInt(m[1], 10, 64)
	off, _ := strconv.ParseInt(m[2], 16, 64)
	return blk*bs + off
}

var reFileACL = regexp.MustCompile(`File ACL: (\d+)`)

func xattrBlock(t *testing.T, img, path string) int64 {
	t.Helper()
	m := reFileACL.FindStringSubmatch(ext4test.Run(t, "debugfs", "-R", "stat "+path, img))
	n, _ := strconv.ParseInt(m[1], 10, 64)
	if n == 0 {
		t.Fatalf("%s has no xattr block", path)
	}
	return n
}

func patch(t *testing.T, img string, off int64, b ...byte) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func le16(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

// TestCorruption damages one structure at a time and checks that the
// reader reports it as the right kind of error, with a message that says
// what is wrong, without panicking or allocating much.
func TestCorruption(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "hello"), []byte("hello\n"), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "big"), ext4test.Pattern(100000, 1), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "d/a"), []byte("a"), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "x"), nil, 0o644)
	must(t, os.Symlink("short", filepath.Join(stage, "d/fast")))
	must(t, os.Symlink(strings.Repeat("y", 100), filepath.Join(stage, "d/slow")))
	base := ext4test.Mkfs(t, stage, "16M")
	baseExt2 := ext4test.Mkfs(t, stage, "16M", "-t", "ext2")
	for _, img := range []string{base, baseExt2} {
		ext4test.SetXattrs(t, img, "/x", map[string][]byte{"user.in": []byte("small"), "user.out": ext4test.Pattern(1000, 2)})
	}
	const bs = 4096

	type damage func(t *testing.T, img string)
	debugfs := func(cmds ...string) damage {
		return func(t *testing.T, img string) { ext4test.Debugfs(t, img, cmds...) }
	}
	atInode := func(path string, rel int64, b ...byte) damage {
		return func(t *testing.T, img string) { patch(t, img, inodeOffset(t, img, path, bs)+rel, b...) }
	}
	inXattrBlock := func(rel int64, b ...byte) damage {
		return func(t *testing.T, img string) { patch(t, img, xattrBlock(t, img, "/x")*bs+rel, b...) }
	}
	// inJournal logs a transaction rewriting /hello's block (with
	// checksums if open says so), then patches log block n.
	inJournal := func(open string, n int, rel int64, b ...byte) damage {
		return func(t *testing.T, img string) {
			blk := bmap(t, img, "/hello", 0)
			writeJournal(t, img, open, []journalTxn{{blocks: []uint64{blk}, data: map[uint64][]byte{blk: make([]byte, bs)}}})
			patch(t, img, int64(bmap(t, img, "<8>", n))*bs+rel, b...)
		}
	}
	for _, c := range []struct {
		name   string
		ext2   bool
		damage damage
		opts   ext4read.Options
		atOpen bool
		kind   error
		msg    string
	}{
		{name: "superblock magic", damage: func(t *testing.T, img string) { patch(t, img, 1024+0x38, 0, 0) },
			atOpen: true, kind: ext4read.ErrCorrupt, msg: "bad magic"},
		{name: "block count", damage: debugfs("ssv blocks_count 99999999"), atOpen: true, kind: ext4read.ErrCorrupt, msg: "larger than the"},
		{name: "block size", damage: debugfs("ssv log_block_size 9"), atOpen: true, kind: ext4read.ErrCorrupt, msg: "block size"},
		{name: "inode count", damage: debugfs("ssv inodes_count 4000000000"), atOpen: true, kind: ext4read.ErrCorrupt, msg: "inodes do not fit"},
		{name: "inline data", damage: debugfs("feature inline_data"), atOpen: true, kind: ext4read.ErrUnsupported, msg: "inline_data"},
		{name: "encryption", damage: debugfs("feature encrypt"), atOpen: true, kind: ext4read.ErrUnsupported, msg: "encrypt"},
		{name: "unknown feature", damage: func(t *testing.T, img string) { patch(t, img, 1024+0x63, 0x80) },
			atOpen: true, kind: ext4read.ErrUnsupported, msg: "unknown incompatible feature 0x80000000"},
		{name: "inode table", damage: debugfs("set_bg 0 inode_table 99999999"), kind: ext4read.ErrCorrupt, msg: "inode table"},
		{name: "extent magic", damage: debugfs("sif /big block[0] 0"), kind: ext4read.ErrCorrupt, msg: "big: inode 12: extent tree node has a bad magic"},
		{name: "extent depth", damage: debugfs("sif /big block[1] 0x00070004"), kind: ext4read.ErrCorrupt, msg: "more than 5"},
		{name: "extent count", damage: debugfs("sif /big block[0] 0x0009F30A"), kind: ext4read.ErrCorrupt, msg: "9 entries"},
		{name: "extent max", damage: debugfs("sif /big block[1] 0x00000009"), kind: ext4read.ErrCorrupt, msg: "room for 9"},
		{name: "extent outside", damage: debugfs("sif /big block[5] 0xFFFFFF00"), kind: ext4read.ErrCorrupt, msg: "outside the filesystem"},
		{name: "extent empty", damage: debugfs("sif /big block[4] 0"), kind: ext4read.ErrCorrupt, msg: "is empty"},
		{name: "block map outside", ext2: true, damage: debugfs("sif /big block[3] 0x0FFFFFF0"), kind: ext4read.ErrCorrupt, msg: "block map points"},
		{name: "indirect outside", ext2: true, damage: debugfs("sif /big block[IND] 0x0FFFFFF0"), kind: ext4read.ErrCorrupt, msg: "indirect block"},
		{name: "record length zero", damage: debugfs("zap_block -f /d -o 4 -l 2 -p 0 0"), kind: ext4read.ErrCorrupt, msg: "record length 0"},
		{name: "record past block", damage: debugfs("zap_block -f /d -o 4 -l 2 -p 0xf0 0"), kind: ext4read.ErrCorrupt, msg: "runs past the block"},
		{name: "name with slash", damage: debugfs("mknod /d/evil p"), kind: ext4read.ErrCorrupt, msg: `"/d/evil" contains '/'`},
		{name: "reserved inode", damage: debugfs("link <7> res"), kind: ext4read.ErrCorrupt, msg: "reserved"},
		{name: "directory hard link", damage: debugfs("link /d /d/loop"), kind: ext4read.ErrCorrupt, msg: "d/loop: inode 13: directory is reached twice"},
		{name: "duplicate name", damage: func(t *testing.T, img string) {
			// Link a2, then shorten its name to "a".
			ext4test.Debugfs(t, img, "link /hello d/a2")
			b, err := os.ReadFile(img)
			must(t, err)
			blk := int64(bmap(t, img, "/d", 0))
			i := bytes.Index(b[blk*bs:(blk+1)*bs], []byte("a2"))
			patch(t, img, blk*bs+int64(i)-2, 1)
		}, kind: ext4read.ErrCorrupt, msg: `two entries named "a"`},
		{name: "huge size", damage: debugfs("sif /hello size 0xFFFFFFFFFFFF"), kind: ext4read.ErrCorrupt, msg: "larger than ext4 allows"},
		{name: "huge directory", damage: debugfs("sif /d size 0x7FFFF000"), kind: ext4read.ErrCorrupt, msg: "larger than the filesystem"},
		{name: "ragged directory", damage: debugfs("sif /d size 5000"), kind: ext4read.ErrCorrupt, msg: "not a multiple"},
		{name: "directory hole", damage: debugfs("sif /d size 8192"), kind: ext4read.ErrCorrupt, msg: "block 1 is a hole"},
		{name: "long symlink", damage: debugfs("sif /d/slow size 5000"), kind: ext4read.ErrCorrupt, msg: "too long"},
		{name: "fast symlink size", damage: debugfs("sif /d/fast size 100"), kind: ext4read.ErrCorrupt, msg: "does not fit"},
		{name: "empty symlink", damage: debugfs("sif /d/fast size 0"), kind: ext4read.ErrCorrupt, msg: "empty target"},
		{name: "symlink NUL", damage: debugfs("sif /d/fast block[0] 0x00616161"), kind: ext4read.ErrCorrupt, msg: "NUL"},
		{name: "bad mode", damage: debugfs("sif /hello mode 0170644"), kind: ext4read.ErrCorrupt, msg: "no valid file type"},
		{name: "extra isize", damage: debugfs("sif /hello extra_isize 200"), kind: ext4read.ErrCorrupt, msg: "extra inode size"},
		{name: "xattr block magic", damage: inXattrBlock(0, 0, 0, 0, 0), kind: ext4read.ErrCorrupt, msg: "bad magic"},
		{name: "xattr block value offset", damage: inXattrBlock(32+2, 0xF0, 0xFF), kind: ext4read.ErrCorrupt, msg: "outside its area"},
		{name: "xattr block value size", damage: inXattrBlock(32+8, 0, 0, 0, 0x7F), kind: ext4read.ErrCorrupt, msg: "does not fit"},
		{name: "xattr block name length", damage: inXattrBlock(32, 0xFF), kind: ext4read.ErrCorrupt, msg: ""},
		{name: "in-inode xattr offset", damage: atInode("/x", 160+4+2, 0xF0, 0x00), kind: ext4read.ErrCorrupt, msg: "outside its area"},
		{name: "in-inode xattr overlapping entries", damage: atInode("/x", 160+4+2, 0, 0), kind: ext4read.ErrCorrupt, msg: "outside its area"},
		{name: "in-inode xattr runaway", damage: atInode("/x", 160+4, 0xFF, 1, 0, 0), kind: ext4read.ErrCorrupt, msg: "runs past its area"},
		{name: "xattr in inode without ea_inode", damage: atInode("/x", 160+4+4, 5), kind: ext4read.ErrCorrupt, msg: "without the ea_inode feature"},
		{name: "journal magic", damage: inJournal("jo", 0, 0, 0), atOpen: true, kind: ext4read.ErrCorrupt, msg: "journal: journal superblock has a bad magic"},
		{name: "journal block size", damage: inJournal("jo", 0, 0xC, 0, 0, 8, 0), atOpen: true, kind: ext4read.ErrCorrupt, msg: "block size 2048 differs"},
		{name: "journal superblock checksum", damage: inJournal("jo -c", 0, 0x18, 9), atOpen: true, kind: ext4read.ErrCorrupt, msg: "superblock checksum"},
		{name: "journal fast commit", damage: inJournal("jo", 0, 0x2B, 0x20), atOpen: true, kind: ext4read.ErrUnsupported, msg: "fast commits"},
		{name: "journal descriptor checksum", damage: inJournal("jo -c", 1, 100, 1), atOpen: true, kind: ext4read.ErrCorrupt, msg: "transaction 1 fails its checksum"},
		{name: "journal tag outside", damage: inJournal("jo", 1, 12, 0x7F), atOpen: true, kind: ext4read.ErrCorrupt, msg: "logs block"},
		{name: "journal start", damage: inJournal("jo", 0, 0x1C, 0x7F), atOpen: true, kind: ext4read.ErrCorrupt, msg: "outside the log"},
		{name: "entry limit", opts: ext4read.Options{MaxEntries: 3}, kind: ext4read.ErrLimit, msg: "more than 3 entries"},
		{name: "depth limit", opts: ext4read.Options{MaxDepth: 1}, damage: debugfs("mkdir /d/e", "mkdir /d/e/f"), kind: ext4read.ErrLimit, msg: "levels deep"},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := base
			if c.ext2 {
				src = baseExt2
			}
			img := ext4test.Copy(t, src)
			if c.damage != nil {
				c.damage(t, img)
			}
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			f, err := os.Open(img)
			must(t, err)
			defer f.Close()
			st, _ := f.Stat()
			fsys, err := ext4read.Open(f, st.Size(), c.opts)
			if err == nil {
				if c.atOpen {
					t.Fatalf("Open succeeded")
				}
				err = readEverything(fsys)
			} else if !c.atOpen {
				t.Fatalf("Open: %v", err)
			}
			if err == nil || !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Errorf("got %v, want a %v error saying %q", err, c.kind, c.msg)
			}
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
				t.Errorf("allocated %d bytes", n)
			}
		})
	}
}

// TestConcurrent reads one FS from several goroutines (run with -race).
func TestConcurrent(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	for i := range 50 {
		ext4test.WriteFile(t, filepath.Join(stage, fmt.Sprintf("d%d/f", i)), ext4test.Pattern(5000, int64(i)), 0o644)
	}
	fsys := ext4test.Open(t, ext4test.Mkfs(t, stage, "16M", "-N", "4096"))
	errs := make(chan error, 4)
	for range 4 {
		go func() { errs <- readEverything(fsys) }()
	}
	for range 4 {
		must(t, <-errs)
	}
}
