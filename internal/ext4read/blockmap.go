package ext4read

import (
	"encoding/binary"
	"sort"
)

// run is a stretch of a file's logical blocks mapped alike: to n
// consecutive physical blocks from pblk, or, when zero is set, to nothing
// (a hole or an uninitialised extent, both read as zeros).
type run struct {
	pblk uint64
	n    uint64 // at least 1
	zero bool
}

// blockMapper maps a file's logical blocks to physical ones.
type blockMapper interface {
	// runAt returns the run that starts at logical block lblk, which is
	// below maxLogicalBlocks.
	runAt(lblk uint64) (run, error)
}

// mapper returns the block mapping of in: an extent tree or, for inodes
// without the extents flag (which ext4 still allows), a block map.
func (fs *FS) mapper(in *Inode) blockMapper {
	if in.Flags&flagExtents != 0 {
		return &extentMapper{fs: fs, root: in.block[:]}
	}
	return &indirectMapper{fs: fs, ptrs: in.block}
}

// Extent tree constants.
const (
	extentMagic    = 0xF30A
	maxExtentDepth = 5
	// An extent longer than this is uninitialised; its length is the
	// excess.
	maxInitExtent = 32768
)

type extentNode struct {
	depth   int
	entries []byte // 12 bytes each
}

func (n *extentNode) count() int { return len(n.entries) / 12 }

// start returns the first logical block of entry i (extent or index).
func (n *extentNode) start(i int) uint64 {
	return uint64(binary.LittleEndian.Uint32(n.entries[12*i:]))
}

// extent decodes leaf entry i.
func (n *extentNode) extent(i int) (start, length, pblk uint64, uninit bool) {
	e := n.entries[12*i:]
	le := binary.LittleEndian
	length = uint64(le.Uint16(e[4:]))
	if length > maxInitExtent {
		length -= maxInitExtent
		uninit = true
	}
	pblk = uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
	return uint64(le.Uint32(e[0:])), length, pblk, uninit
}

// child returns the block index entry i points to.
func (n *extentNode) child(i int) uint64 {
	e := n.entries[12*i:]
	le := binary.LittleEndian
	return uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
}

// parseExtentNode checks one node of an extent tree: its header, and
// entries that are sorted, do not overlap and point inside the
// filesystem. Each node's depth is one less than its parent's, so a
// lookup reads at most maxExtentDepth+1 nodes, whatever the pointers say.
func (fs *FS) parseExtentNode(b []byte, wantDepth int) (extentNode, error) {
	le := binary.LittleEndian
	if len(b) < 12 || le.Uint16(b[0:]) != extentMagic {
		return extentNode{}, corrupt("extent tree node has a bad magic number")
	}
	count, maxCount, depth := int(le.Uint16(b[2:])), int(le.Uint16(b[4:])), int(le.Uint16(b[6:]))
	switch {
	case maxCount > (len(b)-12)/12:
		return extentNode{}, corrupt("extent tree node claims room for %d entries", maxCount)
	case count > maxCount:
		return extentNode{}, corrupt("extent tree node has %d entries, more than its %d", count, maxCount)
	case depth > maxExtentDepth:
		return extentNode{}, corrupt("extent tree is %d deep, more than %d", depth, maxExtentDepth)
	case wantDepth >= 0 && depth != wantDepth:
		return extentNode{}, corrupt("extent tree node at depth %d says it is at depth %d", wantDepth, depth)
	case count == 0 && depth > 0:
		return extentNode{}, corrupt("extent tree index node is empty")
	}
	n := extentNode{depth: depth, entries: b[12 : 12+12*count]}
	var next uint64 // first logical block the next entry may use
	for i := range count {
		if depth > 0 {
			s := n.start(i)
			if i > 0 && s < next {
				return extentNode{}, corrupt("extent tree index entries are out of order")
			}
			next = s + 1
			if c := n.child(i); c < fs.sb.firstDataBlock || c >= fs.sb.blocksCount {
				return extentNode{}, corrupt("extent tree node points to block %d, outside the filesystem", c)
			}
			continue
		}
		s, length, pblk, _ := n.extent(i)
		switch {
		case length == 0:
			return extentNode{}, corrupt("extent at logical block %d is empty", s)
		case s < next:
			return extentNode{}, corrupt("extents at logical block %d overlap or are out of order", s)
		case s+length > maxLogicalBlocks:
			return extentNode{}, corrupt("extent at logical block %d runs past the largest file", s)
		case pblk < fs.sb.firstDataBlock || pblk >= fs.sb.blocksCount || length > fs.sb.blocksCount-pblk:
			return extentNode{}, corrupt("extent at logical block %d maps blocks %d+%d, outside the filesystem", s, pblk, length)
		}
		next = s + length
	}
	return n, nil
}

// extentMapper looks logical blocks up in an extent tree, keeping the
// last leaf it read for sequential reads.
type extentMapper struct {
	fs   *FS
	root []byte

	leaf           extentNode
	leafLo, leafHi uint64 // logical blocks whose lookup ends in leaf
	haveLeaf       bool
}

func (m *extentMapper) runAt(lblk uint64) (run, error) {
	if !m.haveLeaf || lblk < m.leafLo || lblk >= m.leafHi {
		if err := m.descend(lblk); err != nil {
			return run{}, err
		}
	}
	n := &m.leaf
	// The first extent that starts after lblk; the one before it may
	// hold lblk.
	k := sort.Search(n.count(), func(i int) bool { return n.start(i) > lblk })
	if k > 0 {
		s, length, pblk, uninit := n.extent(k - 1)
		if lblk < s+length {
			if uninit {
				return run{n: s + length - lblk, zero: true}, nil
			}
			return run{pblk: pblk + lblk - s, n: s + length - lblk}, nil
		}
	}
	end := m.leafHi
	if k < n.count() {
		end = min(end, n.start(k))
	}
	return run{n: end - lblk, zero: true}, nil
}

// descend reads the path from the root to the leaf that holds lblk. Like
// the kernel, it follows the last index entry starting at or before lblk,
// or the first entry when all start after it.
func (m *extentMapper) descend(lblk uint64) error {
	node, err := m.fs.parseExtentNode(m.root, -1)
	if err != nil {
		return err
	}
	lo, hi := uint64(0), uint64(maxLogicalBlocks)
	for node.depth > 0 {
		i := sort.Search(node.count(), func(i int) bool { return node.start(i) > lblk }) - 1
		if i < 0 {
			i = 0
		} else {
			lo = max(lo, node.start(i))
		}
		if i+1 < node.count() {
			hi = min(hi, node.start(i+1))
		}
		b := make([]byte, m.fs.sb.blockSize)
		if err := m.fs.readBlock(node.child(i), b); err != nil {
			return err
		}
		if node, err = m.fs.parseExtentNode(b, node.depth-1); err != nil {
			return err
		}
	}
	m.leaf, m.leafLo, m.leafHi, m.haveLeaf = node, lo, hi, true
	return nil
}

// indirectMapper looks logical blocks up in a classic block map: twelve
// direct pointers, then single, double and triple indirect blocks. A
// zero pointer is a hole.
type indirectMapper struct {
	fs    *FS
	ptrs  [60]byte
	cache [3]struct { // the last indirect block read at each level
		blk uint64
		b   []byte
	}
}

func (m *indirectMapper) runAt(lblk uint64) (run, error) {
	le := binary.LittleEndian
	apb := uint64(m.fs.sb.blockSize / 4) // pointers per block
	arr, idx := m.ptrs[:12*4], lblk      // the pointer array holding lblk
	if lblk >= 12 {
		l, top, span := lblk-12, 0, apb // span: blocks under one top pointer
		for top = 1; top <= 3 && l >= span; top++ {
			l -= span
			span *= apb
		}
		if top > 3 {
			return run{n: maxLogicalBlocks - min(lblk, maxLogicalBlocks-1), zero: true}, nil
		}
		ptr := uint64(le.Uint32(m.ptrs[4*(11+top):]))
		for level := top; ; level-- {
			if ptr == 0 {
				return run{n: span - l, zero: true}, nil
			}
			b, err := m.block(level-1, ptr)
			if err != nil {
				return run{}, err
			}
			span /= apb
			i := l / span
			l %= span
			if level == 1 {
				arr, idx = b, i
				break
			}
			ptr = uint64(le.Uint32(b[4*i:]))
		}
	}
	// Stretch the run over the following pointers of the same array.
	cnt := uint64(len(arr) / 4)
	p := uint64(le.Uint32(arr[4*idx:]))
	n := uint64(1)
	if p == 0 {
		for idx+n < cnt && le.Uint32(arr[4*(idx+n):]) == 0 {
			n++
		}
		return run{n: n, zero: true}, nil
	}
	if p < m.fs.sb.firstDataBlock || p >= m.fs.sb.blocksCount {
		return run{}, corrupt("block map points to block %d, outside the filesystem", p)
	}
	for idx+n < cnt && p+n < m.fs.sb.blocksCount && uint64(le.Uint32(arr[4*(idx+n):])) == p+n {
		n++
	}
	return run{pblk: p, n: n}, nil
}

func (m *indirectMapper) block(level int, blk uint64) ([]byte, error) {
	c := &m.cache[level]
	if c.b != nil && c.blk == blk {
		return c.b, nil
	}
	if blk < m.fs.sb.firstDataBlock || blk >= m.fs.sb.blocksCount {
		return nil, corrupt("block map points to indirect block %d, outside the filesystem", blk)
	}
	if c.b == nil {
		c.b = make([]byte, m.fs.sb.blockSize)
	}
	c.blk = 0
	if err := m.fs.readBlock(blk, c.b); err != nil {
		c.b = nil
		return nil, err
	}
	c.blk = blk
	return c.b, nil
}
