package ext4read

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// memFS is a filesystem of n zeroed 1 KiB blocks in memory, for feeding
// hand-made structures to the parsers.
func memFS(n int) (*FS, []byte) {
	img := make([]byte, n*1024)
	fs := &FS{r: bytes.NewReader(img), size: int64(len(img)), tables: map[uint32]uint64{},
		opts: Options{MaxEntries: DefaultMaxEntries, MaxDepth: DefaultMaxDepth}}
	fs.sb = superblock{blockSize: 1024, blocksCount: uint64(n), firstDataBlock: 1,
		inodesCount: 64, firstIno: 11, incompat: incompatFiletype}
	return fs, img
}

type extent struct {
	lblk   uint32
	length uint16
	pblk   uint64
}

// extentNode encodes a node: leaf entries when depth is 0, else index
// entries (length unused, pblk the child).
func encodeNode(size, depth int, ents ...extent) []byte {
	b := make([]byte, size)
	le := binary.LittleEndian
	le.PutUint16(b[0:], extentMagic)
	le.PutUint16(b[2:], uint16(len(ents)))
	le.PutUint16(b[4:], uint16((size-12)/12))
	le.PutUint16(b[6:], uint16(depth))
	for i, e := range ents {
		p := b[12+12*i:]
		le.PutUint32(p, e.lblk)
		if depth == 0 {
			le.PutUint16(p[4:], e.length)
			le.PutUint16(p[6:], uint16(e.pblk>>32))
			le.PutUint32(p[8:], uint32(e.pblk))
		} else {
			le.PutUint32(p[4:], uint32(e.pblk))
			le.PutUint16(p[8:], uint16(e.pblk>>32))
		}
	}
	return b
}

func TestExtentTree(t *testing.T) {
	fs, img := memFS(64)
	// A root indexing two leaves, one with an uninitialised extent.
	copy(img[10*1024:], encodeNode(1024, 0, extent{0, 2, 20}, extent{5, 3 + maxInitExtent, 30}))
	copy(img[11*1024:], encodeNode(1024, 0, extent{100, 1, 40}))
	m := &extentMapper{fs: fs, root: encodeNode(60, 1, extent{0, 0, 10}, extent{100, 0, 11})}
	for _, c := range []struct {
		lblk uint64
		want run
	}{
		{0, run{pblk: 20, n: 2}},
		{1, run{pblk: 21, n: 1}},
		{2, run{n: 3, zero: true}},  // hole up to the next extent
		{6, run{n: 2, zero: true}},  // uninitialised
		{8, run{n: 92, zero: true}}, // hole up to the next index entry
		{100, run{pblk: 40, n: 1}},  // the second leaf
		{101, run{n: maxLogicalBlocks - 101, zero: true}},
		{0, run{pblk: 20, n: 2}}, // back to the first leaf
	} {
		got, err := m.runAt(c.lblk)
		if err != nil || got != c.want {
			t.Errorf("runAt(%d) = %+v, %v; want %+v", c.lblk, got, err, c.want)
		}
	}

	for _, c := range []struct {
		name string
		root []byte
		leaf []byte // at block 10
		msg  string
	}{
		{"overlap", encodeNode(60, 0, extent{0, 4, 20}, extent{3, 1, 30}), nil, "overlap"},
		{"order", encodeNode(60, 0, extent{5, 1, 20}, extent{0, 1, 30}), nil, "overlap or are out of order"},
		{"past the largest file", encodeNode(60, 0, extent{0xFFFFFFFF, 2, 20}), nil, "past the largest file"},
		{"index order", encodeNode(60, 1, extent{5, 0, 10}, extent{5, 0, 11}), nil, "out of order"},
		{"index outside", encodeNode(60, 1, extent{0, 0, 1 << 40}), nil, "outside the filesystem"},
		{"index to itself", encodeNode(60, 1, extent{0, 0, 10}), encodeNode(1024, 1, extent{0, 0, 10}), "at depth 0 says it is at depth 1"},
		{"empty index", encodeNode(60, 1), nil, "index node is empty"},
	} {
		copy(img[10*1024:11*1024], make([]byte, 1024))
		if c.leaf != nil {
			copy(img[10*1024:], c.leaf)
		}
		m := &extentMapper{fs: fs, root: c.root}
		if _, err := m.runAt(0); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want %q", c.name, err, c.msg)
		}
	}
}

func TestBlockMap(t *testing.T) {
	fs, img := memFS(400)
	le := binary.LittleEndian
	var ptrs [60]byte
	le.PutUint32(ptrs[0:], 100) // blocks 0-2 at 100-102, then a hole
	le.PutUint32(ptrs[4:], 101)
	le.PutUint32(ptrs[8:], 102)
	le.PutUint32(ptrs[4*12:], 200) // single indirect
	le.PutUint32(ptrs[4*13:], 201) // double indirect, whose second entry is 202
	le.PutUint32(img[200*1024+4*5:], 300)
	le.PutUint32(img[201*1024+4*1:], 202)
	le.PutUint32(img[202*1024+4*7:], 301)
	m := &indirectMapper{fs: fs, ptrs: ptrs}
	apb := uint64(256)
	for _, c := range []struct {
		lblk uint64
		want run
	}{
		{0, run{pblk: 100, n: 3}},
		{2, run{pblk: 102, n: 1}},
		{3, run{n: 9, zero: true}},
		{12, run{n: 5, zero: true}},
		{12 + 5, run{pblk: 300, n: 1}},
		{12 + apb, run{n: apb, zero: true}},                       // first double-indirect entry is a hole
		{12 + 2*apb + 7, run{pblk: 301, n: 1}},                    // through 201 -> 202
		{12 + apb + apb*apb, run{n: apb * apb * apb, zero: true}}, // no triple indirect block
		{12 + apb + apb*apb + apb*apb*apb, run{n: maxLogicalBlocks - (12 + apb + apb*apb + apb*apb*apb), zero: true}},
	} {
		got, err := m.runAt(c.lblk)
		if err != nil || got != c.want {
			t.Errorf("runAt(%d) = %+v, %v; want %+v", c.lblk, got, err, c.want)
		}
	}
}

func TestDirBlock(t *testing.T) {
	fs, _ := memFS(16)
	entry := func(ino uint32, recLen int, name string) []byte {
		b := make([]byte, recLen)
		binary.LittleEndian.PutUint32(b, ino)
		binary.LittleEndian.PutUint16(b[4:], uint16(recLen))
		b[6], b[7] = byte(len(name)), 1
		copy(b[8:], name)
		return b
	}
	block := func(ents ...[]byte) []byte { return bytes.Join(ents, nil) }
	ok := block(entry(12, 12, "."), entry(2, 12, ".."), entry(0, 12, "gone"), entry(13, 988, "file"))
	ents, err := fs.parseDirBlock(ok, true, nil)
	if err != nil || len(ents) != 1 || ents[0] != (DirEntry{"file", 13, TypeRegular}) {
		t.Errorf("parse: %+v, %v", ents, err)
	}
	for _, c := range []struct {
		name  string
		b     []byte
		first bool
		msg   string
	}{
		{"dot elsewhere", block(entry(12, 12, "x"), entry(13, 1012, ".")), true, `named "."`},
		{"dotdot in a later block", block(entry(12, 1024, "..")), false, `named ".."`},
		{"NUL in name", block(entry(12, 1024, "a\x00b")), false, "contains"},
		{"empty name", block(entry(12, 1024, "")), false, "empty name"},
		{"inode out of range", block(entry(65, 1024, "a")), false, "out of range"},
		{"short record", block(entry(12, 8, "a"), entry(12, 1016, "b")), false, "record length 8"},
		{"unaligned record", block(entry(12, 14, "a"), entry(12, 1010, "b")), false, "record length 14"},
		{"name past record", block(entry(12, 12, "abcdefgh"), entry(12, 1012, "b")), false, "longer than its record"},
		{"record past block", block(entry(12, 1020, "a"), make([]byte, 4)), false, "runs past"},
	} {
		if _, err := fs.parseDirBlock(c.b, c.first, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want %q", c.name, err, c.msg)
		}
	}

	// 64 KiB blocks keep record lengths of 64 KiB and more in 16 bits.
	fs.sb.blockSize = 65536
	big := make([]byte, 65536)
	copy(big, entry(13, 12, "a"))
	binary.LittleEndian.PutUint16(big[4:], 65535) // the whole block
	if ents, err := fs.parseDirBlock(big, false, nil); err != nil || len(ents) != 1 {
		t.Errorf("64 KiB record: %+v, %v", ents, err)
	}
}

func TestACL(t *testing.T) {
	le := binary.LittleEndian
	disk := le.AppendUint32(nil, 1)
	disk = append(disk, le.AppendUint16(le.AppendUint16(nil, aclUserObj), 6)...)
	disk = append(disk, le.AppendUint32(le.AppendUint16(le.AppendUint16(nil, aclUser), 4), 1000)...)
	got, err := aclToXattr(disk)
	want := le.AppendUint32(nil, 2)
	want = le.AppendUint32(le.AppendUint16(le.AppendUint16(want, aclUserObj), 6), aclUndefinedID)
	want = le.AppendUint32(le.AppendUint16(le.AppendUint16(want, aclUser), 4), 1000)
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("aclToXattr = %x, %v; want %x", got, err, want)
	}
	for _, bad := range [][]byte{nil, le.AppendUint32(nil, 2), append(le.AppendUint32(nil, 1), 2, 0, 4, 0), append(le.AppendUint32(nil, 1), 0x40, 0, 0, 0)} {
		if _, err := aclToXattr(bad); !errors.Is(err, ErrCorrupt) {
			t.Errorf("aclToXattr(%x): %v", bad, err)
		}
	}
}

func TestChecksums(t *testing.T) {
	// The check values of CRC-32/MPEG-2 (the kernel's crc32_be from ~0)
	// and of CRC-32C.
	if got := crc32BE(^uint32(0), []byte("123456789")); got != 0x0376E6E7 {
		t.Errorf("crc32BE = %#x", got)
	}
	if got := ^crc32cRaw(^uint32(0), []byte("123456789")); got != 0xE3069283 {
		t.Errorf("crc32c = %#x", got)
	}
	if !tidAfter(1, 0xFFFFFFFF) || tidAfter(0xFFFFFFFF, 1) || tidAfter(5, 5) {
		t.Errorf("tidAfter does not wrap")
	}
}
