package ext4read_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

var jbd2Magic = []byte{0xC0, 0x3B, 0x39, 0x98}

// journalTxn is a transaction to log with debugfs: new contents for
// blocks, blocks to revoke, and whether to leave it uncommitted.
type journalTxn struct {
	blocks   []uint64
	data     map[uint64][]byte
	revoke   []uint64
	noCommit bool
}

func writeJournal(t *testing.T, img, open string, txns []journalTxn) {
	t.Helper()
	cmds := []string{open}
	for i, txn := range txns {
		cmd := "jw"
		if txn.noCommit {
			cmd += " -c"
		}
		if len(txn.revoke) > 0 {
			cmd += " -r " + joinBlocks(txn.revoke)
		}
		if len(txn.blocks) > 0 {
			var buf bytes.Buffer
			for _, b := range txn.blocks {
				buf.Write(txn.data[b])
			}
			f := filepath.Join(t.TempDir(), fmt.Sprintf("txn%d", i))
			must(t, os.WriteFile(f, buf.Bytes(), 0o644))
			cmd += " -b " + joinBlocks(txn.blocks) + " " + f
		}
		cmds = append(cmds, cmd)
	}
	out := ext4test.Debugfs(t, img, append(cmds, "jc")...)
	if strings.Contains(out, "journal_write:") || strings.Contains(out, "not open") {
		t.Fatalf("debugfs could not write the journal:\n%s", out)
	}
}

func joinBlocks(bs []uint64) string {
	s := make([]string, len(bs))
	for i, b := range bs {
		s[i] = strconv.FormatUint(b, 10)
	}
	return strings.Join(s, ",")
}

func readBlocks(t *testing.T, img string, bs int) [][]byte {
	t.Helper()
	b, err := os.ReadFile(img)
	must(t, err)
	var blocks [][]byte
	for off := 0; off+bs <= len(b); off += bs {
		blocks = append(blocks, b[off:off+bs])
	}
	return blocks
}

func bmap(t *testing.T, img, path string, lblk int) uint64 {
	t.Helper()
	out := ext4test.Run(t, "debugfs", "-R", fmt.Sprintf("bmap %s %d", path, lblk), img)
	fields := strings.Fields(strings.TrimSuffix(strings.TrimSpace(out), "(uninit)"))
	n, err := strconv.ParseUint(fields[len(fields)-1], 10, 64)
	if err != nil {
		t.Fatalf("bmap %s: %s", path, out)
	}
	return n
}

func fileHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	must(t, err)
	return sha256.Sum256(b)
}

// TestJournalReplay logs changes made to a copy of an image into the
// image's journal with debugfs, then checks that the reader sees, block
// for block, what e2fsck's journal replay leaves, without writing.
func TestJournalReplay(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "hello"), []byte("hello\n"), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "d/gone"), []byte("bye"), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "keep"), ext4test.Pattern(20000, 1), 0o644)
	local := t.TempDir()
	added := filepath.Join(local, "added")
	must(t, os.WriteFile(added, ext4test.Pattern(9000, 2), 0o644))
	magic := filepath.Join(local, "magic")
	must(t, os.WriteFile(magic, append(append([]byte{}, jbd2Magic...), ext4test.Pattern(5000, 3)...), 0o644))

	for _, c := range []struct {
		name     string
		mkfs     []string
		open     string
		v1       bool // the old checksum, which does not cover revoke blocks
		sameTxn  bool // revoke a block in the transaction that logs it
		features string
	}{
		{name: "csum-v3", open: "jo -c", features: "journal_checksum_v3"},
		{name: "csum-v2", open: "jo -c -v 2", features: "journal_checksum_v2"},
		{name: "no-csum", open: "jo", features: "journal_64bit"},
		{name: "v1-csum-1k-32bit", mkfs: []string{"-b", "1024", "-O", "^metadata_csum,^64bit"}, open: "jo -c", v1: true, features: "journal_checksum"},
		{name: "ext3", mkfs: []string{"-t", "ext3"}, open: "jo", features: "journal_incompat_revoke"},
		{name: "revoke-in-same-transaction", open: "jo -c", sameTxn: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img := ext4test.Mkfs(t, stage, "16M", c.mkfs...)
			bs := int(ext4test.Open(t, img).BlockSize())
			mod := ext4test.Copy(t, img)
			ext4test.Debugfs(t, mod,
				"sif /hello mode 0100600",
				"zap_block -f /hello -p 0x41 0",
				"write "+added+" added",
				"write "+magic+" magic",
				"rm /d/gone",
				"mkdir newdir",
				"ea_set /keep user.x yes")
			helloBlk := bmap(t, img, "/hello", 0)
			rootBlk := bmap(t, img, "/", 0)
			before, after := readBlocks(t, img, bs), readBlocks(t, mod, bs)
			data := map[uint64][]byte{}
			var changed []uint64
			for i := range before {
				if !bytes.Equal(before[i], after[i]) {
					changed = append(changed, uint64(i))
					data[uint64(i)] = after[i]
				}
			}
			if len(changed) < 6 {
				t.Fatalf("only %d blocks changed", len(changed))
			}
			// Two transactions with the changes (the /hello block in the
			// first), one revoking the /hello block, one left
			// uncommitted that would clobber the root directory.
			var t1, t2 []uint64
			for i, b := range changed {
				if b == helloBlk || (i%2 == 0 && b != rootBlk) {
					t1 = append(t1, b)
				} else {
					t2 = append(t2, b)
				}
			}
			garbage := map[uint64][]byte{rootBlk: bytes.Repeat([]byte{0xEE}, bs)}
			txns := []journalTxn{
				{blocks: t1, data: data},
				{blocks: t2, data: data},
				{revoke: []uint64{helloBlk}},
				{blocks: []uint64{rootBlk}, data: garbage, noCommit: true},
			}
			if c.sameTxn {
				txns = []journalTxn{{blocks: changed, data: data, revoke: []uint64{helloBlk}}}
			}
			writeJournal(t, img, c.open, txns)
			dump := ext4test.Run(t, "dumpe2fs", "-h", img)
			if !strings.Contains(dump, "needs_recovery") || !strings.Contains(dump, c.features) {
				t.Fatalf("the journal is not as the test expects:\n%s", dump)
			}

			want := ext4test.Copy(t, img)
			ext4test.Fsck(t, want, "-y", "-E", "journal_only")
			sum := fileHash(t, img)
			fsys := ext4test.Open(t, img)

			// Block for block, but for the superblock and the journal's,
			// which e2fsck updates after replaying.
			replayed := readBlocks(t, want, bs)
			skip := map[uint64]bool{uint64(1024 / bs): true, bmap(t, want, "<8>", 0): true}
			b := make([]byte, bs)
			for i := uint64(0); i < fsys.Blocks(); i++ {
				must(t, fsys.ReadBlock(i, b))
				if !skip[i] && !bytes.Equal(b, replayed[i]) {
					t.Errorf("block %d differs from e2fsck's replay", i)
				}
			}
			compareWithDebugfs(t, want, fsys)

			hello := lookupInode(t, fsys, "/hello")
			wantHello := "hello\n"
			if c.v1 {
				// debugfs checksums the revoke block, the kernel's
				// replay (and e2fsck's) does not: the revoking
				// transaction fails its checksum and ends the log.
				wantHello = strings.Repeat("A", 6)
			}
			if got := string(content(t, fsys, "/hello")); hello.Mode != 0o600 || got != wantHello {
				t.Errorf("/hello: mode %o, content %q, want %q", hello.Mode, got, wantHello)
			}
			if got := content(t, fsys, "/magic"); !bytes.HasPrefix(got, jbd2Magic) {
				t.Errorf("/magic starts with %x: the escaped block was not restored", got[:4])
			}
			if _, err := fsys.Lookup("/d/gone"); err == nil {
				t.Errorf("/d/gone is still there")
			}
			if fileHash(t, img) != sum {
				t.Errorf("reading the image changed it")
			}
		})
	}
}

// TestJournalClean: an image whose journal needs no recovery reads as it
// is, and a journal with only an uncommitted transaction replays nothing.
func TestJournalUncommitted(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "hello"), []byte("hello\n"), 0o644)
	img := ext4test.Mkfs(t, stage, "16M")
	blk := bmap(t, img, "/hello", 0)
	writeJournal(t, img, "jo -c", []journalTxn{{
		blocks: []uint64{blk}, data: map[uint64][]byte{blk: bytes.Repeat([]byte("X"), 4096)}, noCommit: true,
	}})
	fsys := ext4test.Open(t, img)
	if got := string(content(t, fsys, "/hello")); got != "hello\n" {
		t.Errorf("/hello = %q: an uncommitted transaction was replayed", got)
	}
	sorted := []string{"hello", "lost+found"}
	ents, err := fsys.ReadDir(ext4read.RootIno)
	must(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	sort.Strings(names)
	if strings.Join(names, ",") != strings.Join(sorted, ",") {
		t.Errorf("root: %v", names)
	}
}

// TestSameBlocks compares block mappings between an image and copies of
// it: one that rewrote a file, one whose journal replaces a block.
func TestSameBlocks(t *testing.T) {
	ext4test.Require(t)
	stage := t.TempDir()
	ext4test.WriteFile(t, filepath.Join(stage, "a"), ext4test.Pattern(10000, 1), 0o644)
	ext4test.WriteFile(t, filepath.Join(stage, "b"), ext4test.Pattern(10000, 2), 0o644)
	img := ext4test.Mkfs(t, stage, "16M")
	local := filepath.Join(t.TempDir(), "new")
	must(t, os.WriteFile(local, ext4test.Pattern(10000, 3), 0o644))
	rewritten := ext4test.Copy(t, img)
	// Written before /a goes, so that it cannot take /a's blocks.
	ext4test.Debugfs(t, rewritten, "write "+local+" c", "rm /a", "link /c /a", "unlink /c")
	journaled := ext4test.Copy(t, img)
	blk := bmap(t, img, "/b", 1)
	writeJournal(t, journaled, "jo", []journalTxn{{blocks: []uint64{blk}, data: map[uint64][]byte{blk: ext4test.Pattern(4096, 4)}}})

	same := func(x, y *ext4read.FS, path string) bool {
		f, err := x.Open(lookup(t, x, path))
		must(t, err)
		g, err := y.Open(lookup(t, y, path))
		must(t, err)
		ok, err := f.SameBlocks(g)
		must(t, err)
		return ok
	}
	orig := ext4test.Open(t, img)
	for _, c := range []struct {
		other *ext4read.FS
		path  string
		want  bool
	}{
		{ext4test.Open(t, img), "/a", true},
		{ext4test.Open(t, rewritten), "/a", false},
		{ext4test.Open(t, rewritten), "/b", true},
		{ext4test.Open(t, journaled), "/a", true},
		{ext4test.Open(t, journaled), "/b", false},
	} {
		if got := same(orig, c.other, c.path); got != c.want {
			t.Errorf("%s: SameBlocks = %v, want %v", c.path, got, c.want)
		}
	}
	f, err := orig.Open(lookup(t, orig, "/a"))
	must(t, err)
	g, err := orig.Open(lookup(t, orig, "/b"))
	must(t, err)
	if ok, _ := f.SameBlocks(g); ok {
		t.Errorf("two files share blocks")
	}
}
