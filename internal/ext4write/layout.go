package ext4write

import (
	"fmt"

	"github.com/kilnfs/kiln/internal/fstree"
)

// On-disk constants of the filesystems kiln writes: 4 KiB blocks, 256-byte
// inodes with 32 bytes of extra fields, 64-byte group descriptors.
const (
	blockSize      = 4096
	inodeSize      = 256
	extraIsize     = 32
	maxPerGroup    = 8 * blockSize // blocks or inodes: one bitmap block each
	descSize       = 64
	inodesPerBlock = blockSize / inodeSize
	logGroupsFlex  = 4 // flex_bg groups of 16, as mke2fs makes them

	rootIno    = 2
	journalIno = 8
	firstIno   = 11 // first inode not reserved by the filesystem

	maxExtentLen = 32768 // longest initialized extent, in blocks
	maxLinks     = 65000 // EXT4_LINK_MAX
)

// The feature set: what e2fsprogs 1.46 and kernels since 4.x accept, the
// same as the e2fsprogs writer's (see internal/ext4's mke2fsConfig plus
// metadata_csum), less resize_inode, which only reserves room for growing
// the filesystem online.
const (
	compatHasJournal = 0x4
	compatExtAttr    = 0x8
	compatDirIndex   = 0x20

	incompatFiletype = 0x2
	incompatExtents  = 0x40
	incompat64bit    = 0x80
	incompatFlexBg   = 0x200

	roCompatSparseSuper  = 0x1
	roCompatLargeFile    = 0x2
	roCompatHugeFile     = 0x8
	roCompatDirNlink     = 0x20
	roCompatExtraIsize   = 0x40
	roCompatMetadataCsum = 0x400
)

// Inode flags.
const (
	flagIndex   = 0x1000
	flagExtents = 0x80000
)

// geometry is how a filesystem of a given size is cut into groups.
type geometry struct {
	blocks       int64  // blocks in the filesystem
	bpg          int64  // blocks per group
	groups       int64  // block groups
	ipg          uint32 // inodes per group
	itableBlocks int64  // inode table blocks per group
	gdtBlocks    int64  // blocks of group descriptors
}

// newGeometry lays out a filesystem of size bytes with room for at least
// inodes inodes.
func newGeometry(size, inodes int64) (geometry, error) {
	var g geometry
	g.blocks = size / blockSize
	if g.blocks < 1024 {
		return g, fmt.Errorf("a filesystem of %d bytes is too small", size)
	}
	// Full groups, unless the inodes need more groups than that makes
	// (each holds at most maxPerGroup): then smaller ones, as mke2fs
	// makes them.
	g.bpg = maxPerGroup
	if need := (inodes + maxPerGroup - 1) / maxPerGroup; need > (g.blocks+g.bpg-1)/g.bpg {
		g.bpg = ((g.blocks+need-1)/need + 7) &^ 7
	}
	g.groups = (g.blocks + g.bpg - 1) / g.bpg
	g.gdtBlocks = (g.groups*descSize + blockSize - 1) / blockSize
	// A last group too small for its own metadata is dropped, as
	// mke2fs does.
	if last := g.blocks - (g.groups-1)*g.bpg; g.groups > 1 && last < 1+g.gdtBlocks+64 {
		g.blocks -= last
		g.groups--
	}
	ipg := (inodes + g.groups - 1) / g.groups
	ipg = (ipg + inodesPerBlock - 1) / inodesPerBlock * inodesPerBlock
	ipg = max(ipg, inodesPerBlock)
	ipg = min(ipg, maxPerGroup, (1<<32-1)/g.groups/inodesPerBlock*inodesPerBlock)
	g.ipg = uint32(ipg)
	g.itableBlocks = ipg * inodeSize / blockSize
	return g, nil
}

func (g geometry) inodes() uint32 { return g.ipg * uint32(g.groups) }

var hasSuper = fstree.SuperCopyGroup

// allocator hands out blocks in ascending order, skipping the superblock
// and descriptor copies, and records them in the block bitmap.
type allocator struct {
	g      geometry
	next   int64
	bitmap []byte // one bit per block of the filesystem
}

func newAllocator(g geometry) *allocator {
	a := &allocator{g: g, bitmap: make([]byte, g.groups*g.bpg/8)}
	for grp := int64(0); grp < g.groups; grp++ {
		if hasSuper(grp) {
			a.mark(grp*a.g.bpg, 1+g.gdtBlocks)
		}
	}
	// Bits past the end of the filesystem are set, as e2fsck expects.
	a.mark(g.blocks, g.groups*a.g.bpg-g.blocks)
	return a
}

func (a *allocator) mark(start, n int64) {
	for b := start; b < start+n; b++ {
		a.bitmap[b/8] |= 1 << (b % 8)
	}
}

// reservedEnd returns the end of the superblock copy that block b falls
// in, or b if it is free to take.
func (a *allocator) reservedEnd(b int64) int64 {
	grp := b / a.g.bpg
	if off := b - grp*a.g.bpg; hasSuper(grp) && off < 1+a.g.gdtBlocks {
		return grp*a.g.bpg + 1 + a.g.gdtBlocks
	}
	return b
}

// nextReserved returns the first block of the next superblock copy after
// block b, or the end of the filesystem.
func (a *allocator) nextReserved(b int64) int64 {
	for grp := b/a.g.bpg + 1; grp < a.g.groups; grp++ {
		if hasSuper(grp) {
			return grp * a.g.bpg
		}
	}
	return a.g.blocks
}

func (a *allocator) used(b int64) bool { return a.bitmap[b/8]&(1<<(b%8)) != 0 }

// take returns the next run of free blocks, at most n long.
func (a *allocator) take(n int64) (start, got int64, err error) {
	a.next = a.reservedEnd(a.next)
	if a.next >= a.g.blocks {
		return 0, 0, errNoSpace
	}
	start = a.next
	end := min(start+n, a.g.blocks)
	// Stop before the next superblock copy, if any.
	for grp := start/a.g.bpg + 1; grp*a.g.bpg < end; grp++ {
		if hasSuper(grp) {
			end = grp * a.g.bpg
			break
		}
	}
	a.mark(start, end-start)
	a.next = end
	return start, end - start, nil
}

// contiguous returns n blocks in one run, leaving free whatever it skips.
func (a *allocator) contiguous(n int64) (int64, error) {
	for {
		a.next = a.reservedEnd(a.next)
		start := a.next
		end := start + n
		if end > a.g.blocks {
			return 0, errNoSpace
		}
		clear := true
		for grp := start/a.g.bpg + 1; grp*a.g.bpg < end; grp++ {
			if hasSuper(grp) {
				a.next = grp * a.g.bpg
				clear = false
				break
			}
		}
		if clear {
			a.mark(start, n)
			a.next = end
			return start, nil
		}
	}
}

// piece is a run of blocks the allocator gave.
type piece struct{ start, length int64 }

// blocks returns n blocks as runs, in order.
func (a *allocator) blocks(n int64) ([]piece, error) {
	var out []piece
	for n > 0 {
		s, got, err := a.take(n)
		if err != nil {
			return nil, err
		}
		if k := len(out) - 1; k >= 0 && out[k].start+out[k].length == s {
			out[k].length += got
		} else {
			out = append(out, piece{s, got})
		}
		n -= got
	}
	return out, nil
}

// freeIn counts the free blocks of a group.
func (a *allocator) freeIn(grp int64) int64 {
	var used int64
	for _, b := range a.bitmap[grp*a.g.bpg/8 : (grp+1)*a.g.bpg/8] {
		used += int64(popcount[b])
	}
	return a.g.bpg - used
}

var popcount = func() (t [256]uint8) {
	for i := range t {
		for b := i; b != 0; b &= b - 1 {
			t[i]++
		}
	}
	return t
}()
