package ext4write

import (
	"encoding/binary"

	"github.com/kilnfs/kiln/internal/ext4"
)

// journalInode lays out an empty, clean journal (jbd2 superblock version
// 2, sized as mke2fs sizes it) and returns its inode.
func (w *writer) journalInode() ([]byte, error) {
	jblocks := ext4.JournalBlocks(w.g.blocks)
	if jblocks == 0 {
		return make([]byte, inodeSize), nil // too small for one
	}
	pieces, err := w.alloc.blocks(jblocks)
	if err != nil {
		return nil, err
	}
	be := binary.BigEndian
	sb := make([]byte, blockSize)
	be.PutUint32(sb[0x0:], 0xC03B3998) // magic
	be.PutUint32(sb[0x4:], 4)          // superblock, version 2
	be.PutUint32(sb[0xC:], blockSize)
	be.PutUint32(sb[0x10:], uint32(jblocks))
	be.PutUint32(sb[0x14:], 1) // first log block
	be.PutUint32(sb[0x18:], 1) // first sequence
	copy(sb[0x30:], w.uuid[:])
	be.PutUint32(sb[0x40:], 1) // users
	if err := w.meta.WriteAt(sb, pieces[0].start*blockSize); err != nil {
		return nil, err
	}

	le := binary.LittleEndian
	raw := make([]byte, inodeSize)
	le.PutUint16(raw[0x0:], 0o100600)
	le.PutUint16(raw[0x1A:], 1)
	for _, off := range [][2]int{{0x08, 0x8C}, {0x0C, 0x84}, {0x10, 0x88}, {0x90, 0x94}} {
		putTime(raw, off[0], off[1], w.epoch)
	}
	le.PutUint16(raw[0x80:], extraIsize)
	tree, err := w.extentTree(journalIno, extentsFor([]span{{0, jblocks}}, pieces), raw[0x28:0x64])
	if err != nil {
		return nil, err
	}
	size := jblocks * blockSize
	le.PutUint32(raw[0x04:], uint32(size))
	le.PutUint32(raw[0x6C:], uint32(size>>32))
	le.PutUint32(raw[0x1C:], uint32((jblocks+tree)*(blockSize/512)))
	le.PutUint32(raw[0x20:], flagExtents)
	copy(w.journal[:], raw[0x28:0x64])
	return raw, nil
}

// finish writes the bitmaps, the group descriptors and the superblock
// with their backups, now that every block and inode is placed.
func (w *writer) finish() error {
	le := binary.LittleEndian
	g := w.g
	used := firstIno - 1 + w.inodes // inodes 1..used are taken
	desc := make([]byte, g.gdtBlocks*blockSize)
	var freeBlocks, freeInodes int64
	// The block bitmaps are final only now; written in order, then the
	// inode bitmaps, they go out in two sequential runs.
	bb := make([]byte, blockSize)
	for grp := int64(0); grp < g.groups; grp++ {
		copy(bb, w.alloc.bitmap[grp*g.bpg/8:(grp+1)*g.bpg/8])
		setPadding(bb, g.bpg)
		if err := w.meta.WriteAt(bb, (w.blockBitmaps+grp)*blockSize); err != nil {
			return err
		}
	}
	ib := make([]byte, blockSize)
	for grp := int64(0); grp < g.groups; grp++ {
		bb := w.alloc.bitmap[grp*g.bpg/8 : (grp+1)*g.bpg/8]
		inUse := min(max(int64(used)-grp*int64(g.ipg), 0), int64(g.ipg))
		clear(ib)
		for i := int64(0); i < inUse; i++ {
			ib[i/8] |= 1 << (i % 8)
		}
		setPadding(ib, int64(g.ipg))
		if err := w.meta.WriteAt(ib, (w.inodeBitmaps+grp)*blockSize); err != nil {
			return err
		}
		free := w.alloc.freeIn(grp)
		freeBlocks += free
		freeInodes += int64(g.ipg) - inUse

		d := desc[grp*descSize : (grp+1)*descSize]
		put64 := func(lo, hi int, v int64) {
			le.PutUint32(d[lo:], uint32(v))
			le.PutUint32(d[hi:], uint32(v>>32))
		}
		put32 := func(lo, hi int, v uint32) {
			le.PutUint16(d[lo:], uint16(v))
			le.PutUint16(d[hi:], uint16(v>>16))
		}
		put64(0x00, 0x20, w.blockBitmaps+grp)
		put64(0x04, 0x24, w.inodeBitmaps+grp)
		put64(0x08, 0x28, w.itables[grp])
		put32(0x0C, 0x2C, uint32(free))
		put32(0x0E, 0x2E, g.ipg-uint32(inUse))
		put32(0x10, 0x30, w.dirsIn[grp])
		flags := uint16(0x4) // inode table zeroed
		if inUse == 0 {
			flags |= 0x1 // inodes uninitialised
		}
		le.PutUint16(d[0x12:], flags)
		put32(0x18, 0x38, crc32c(w.fsSeed, bb))
		put32(0x1A, 0x3A, crc32c(w.fsSeed, ib[:g.ipg/8]))
		put32(0x1C, 0x32, g.ipg-uint32(inUse))
		var gb [4]byte
		le.PutUint32(gb[:], uint32(grp))
		le.PutUint16(d[0x1E:], uint16(crc32c(crc32c(w.fsSeed, gb[:]), d)))
	}

	sb := w.superblock(freeBlocks, freeInodes)
	// Whole blocks: the first holds the superblock after 1024 bytes left
	// for a boot loader, a copy's at its start; the rest is zeros (the
	// block may have held contents, see place).
	block := make([]byte, blockSize)
	for grp := int64(0); grp < g.groups; grp++ {
		if !hasSuper(grp) {
			continue
		}
		le.PutUint16(sb[0x5A:], uint16(grp))
		le.PutUint32(sb[0x3FC:], crc32c(^uint32(0), sb[:0x3FC]))
		clear(block)
		if grp == 0 {
			copy(block[1024:], sb)
		} else {
			copy(block, sb)
		}
		if err := w.meta.WriteAt(block, grp*g.bpg*blockSize); err != nil {
			return err
		}
		if err := w.meta.WriteAt(desc, (grp*g.bpg+1)*blockSize); err != nil {
			return err
		}
	}
	return nil
}

func (w *writer) superblock(freeBlocks, freeInodes int64) []byte {
	le := binary.LittleEndian
	g := w.g
	sb := make([]byte, 1024)
	now := uint32(max(w.epoch.Unix(), 0))
	le.PutUint32(sb[0x00:], g.inodes())
	le.PutUint32(sb[0x04:], uint32(g.blocks))
	le.PutUint32(sb[0x150:], uint32(g.blocks>>32))
	le.PutUint32(sb[0x0C:], uint32(freeBlocks))
	le.PutUint32(sb[0x158:], uint32(freeBlocks>>32))
	le.PutUint32(sb[0x10:], uint32(freeInodes))
	le.PutUint32(sb[0x14:], 0) // first data block
	le.PutUint32(sb[0x18:], 2) // 4 KiB blocks
	le.PutUint32(sb[0x1C:], 2)
	le.PutUint32(sb[0x20:], uint32(g.bpg))
	le.PutUint32(sb[0x24:], uint32(g.bpg))
	le.PutUint32(sb[0x28:], g.ipg)
	le.PutUint32(sb[0x30:], now)    // write time
	le.PutUint16(sb[0x36:], 0xFFFF) // no mount count checks
	le.PutUint16(sb[0x38:], 0xEF53)
	le.PutUint16(sb[0x3A:], 1) // clean
	le.PutUint16(sb[0x3C:], 1) // continue on errors
	le.PutUint32(sb[0x40:], now)
	le.PutUint32(sb[0x4C:], 1) // dynamic revision
	le.PutUint32(sb[0x54:], firstIno)
	le.PutUint16(sb[0x58:], inodeSize)
	compat := uint32(compatExtAttr | compatDirIndex)
	jsize := ext4.JournalBlocks(g.blocks) * blockSize
	if jsize > 0 {
		compat |= compatHasJournal
		le.PutUint32(sb[0xE0:], journalIno)
		sb[0xFD] = 1 // s_jnl_blocks holds a copy of the journal's i_block
		copy(sb[0x10C:], w.journal[:])
		le.PutUint32(sb[0x10C+15*4:], uint32(jsize>>32))
		le.PutUint32(sb[0x10C+16*4:], uint32(jsize))
	}
	le.PutUint32(sb[0x5C:], compat)
	le.PutUint32(sb[0x60:], incompatFiletype|incompatExtents|incompat64bit|incompatFlexBg)
	le.PutUint32(sb[0x64:], roCompatSparseSuper|roCompatLargeFile|roCompatHugeFile|roCompatDirNlink|roCompatExtraIsize|roCompatMetadataCsum)
	copy(sb[0x68:], w.uuid[:])
	for i, v := range w.dirs.hashSeed {
		le.PutUint32(sb[0xEC+4*i:], v)
	}
	sb[0xFC] = hashHalfMD4
	le.PutUint16(sb[0xFE:], descSize)
	le.PutUint32(sb[0x100:], 0x4|0x8) // user_xattr, acl
	le.PutUint32(sb[0x108:], now)     // mkfs time
	le.PutUint16(sb[0x15C:], extraIsize)
	le.PutUint16(sb[0x15E:], extraIsize)
	le.PutUint32(sb[0x160:], 1) // signed directory hash
	sb[0x174] = logGroupsFlex
	sb[0x175] = 1 // crc32c checksums
	return sb
}

// setPadding sets the bits of a bitmap block past the n a group uses, as
// e2fsck expects.
func setPadding(b []byte, n int64) {
	for i := n; i < maxPerGroup; i++ {
		b[i/8] |= 1 << (i % 8)
	}
}
