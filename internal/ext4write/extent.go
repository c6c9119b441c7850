package ext4write

import "encoding/binary"

// span is a run of a file's logical blocks.
type span struct{ first, count int64 }

// extent maps length logical blocks from logical to start on disk.
type extent struct {
	logical uint32
	start   int64
	length  uint32
}

const (
	extentMagic    = 0xF30A
	extentHead     = 12
	extentsInInode = 4
	extentsInBlock = (blockSize - extentHead - 4) / 12 // less the checksum tail
)

// extentsFor maps a file's logical spans, in order, onto the pieces the
// allocator gave it, in order, as extents no longer than ext4 allows.
func extentsFor(spans []span, pieces []piece) []extent {
	var out []extent
	pi, used := 0, int64(0)
	for _, s := range spans {
		logical, left := s.first, s.count
		for left > 0 {
			p := pieces[pi]
			n := min(left, p.length-used, maxExtentLen)
			start := p.start + used
			if k := len(out) - 1; k >= 0 && int64(out[k].logical)+int64(out[k].length) == logical &&
				out[k].start+int64(out[k].length) == start && int64(out[k].length)+n <= maxExtentLen {
				out[k].length += uint32(n)
			} else {
				out = append(out, extent{logical: uint32(logical), start: start, length: uint32(n)})
			}
			logical, left, used = logical+n, left-n, used+n
			if used == p.length {
				pi, used = pi+1, 0
			}
		}
	}
	return out
}

func putExtentHeader(b []byte, entries, max, depth int) {
	le := binary.LittleEndian
	le.PutUint16(b[0:], extentMagic)
	le.PutUint16(b[2:], uint16(entries))
	le.PutUint16(b[4:], uint16(max))
	le.PutUint16(b[6:], uint16(depth))
}

func putExtent(b []byte, e extent) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], e.logical)
	le.PutUint16(b[4:], uint16(e.length))
	le.PutUint16(b[6:], uint16(e.start>>32))
	le.PutUint32(b[8:], uint32(e.start))
}

// index is an entry of an interior extent tree level: the first logical
// block below it and the block holding the level below.
type index struct {
	logical uint32
	block   int64
}

func putIndex(b []byte, x index) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], x.logical)
	le.PutUint32(b[4:], uint32(x.block))
	le.PutUint16(b[8:], uint16(x.block>>32))
}

// extentTree writes a file's extents into its inode's i_block, with as
// many levels of tree blocks as they need, and returns how many blocks
// the tree took.
func (w *writer) extentTree(ino uint32, exts []extent, iblock []byte) (int64, error) {
	if len(exts) <= extentsInInode {
		putExtentHeader(iblock, len(exts), extentsInInode, 0)
		for i, e := range exts {
			putExtent(iblock[extentHead+12*i:], e)
		}
		return 0, nil
	}
	seed := inodeSeed(w.fsSeed, ino, 0)
	var used int64
	// writeLevel stores n entries per block and returns the index of
	// the blocks it wrote.
	writeLevel := func(count, depth int, put func(b []byte, i int), first func(i int) uint32) ([]index, error) {
		var idx []index
		for lo := 0; lo < count; lo += extentsInBlock {
			hi := min(lo+extentsInBlock, count)
			pieces, err := w.alloc.blocks(1)
			if err != nil {
				return nil, err
			}
			blk := pieces[0].start
			b := make([]byte, blockSize)
			putExtentHeader(b, hi-lo, extentsInBlock, depth)
			for i := lo; i < hi; i++ {
				put(b[extentHead+12*(i-lo):], i)
			}
			tail := extentHead + 12*extentsInBlock
			binary.LittleEndian.PutUint32(b[tail:], crc32c(seed, b[:tail]))
			if err := w.meta.WriteAt(b, blk*blockSize); err != nil {
				return nil, err
			}
			used++
			idx = append(idx, index{logical: first(lo), block: blk})
		}
		return idx, nil
	}
	idx, err := writeLevel(len(exts), 0, func(b []byte, i int) { putExtent(b, exts[i]) }, func(i int) uint32 { return exts[i].logical })
	if err != nil {
		return 0, err
	}
	depth := 1
	for len(idx) > extentsInInode {
		lower := idx
		if idx, err = writeLevel(len(lower), depth, func(b []byte, i int) { putIndex(b, lower[i]) }, func(i int) uint32 { return lower[i].logical }); err != nil {
			return 0, err
		}
		depth++
	}
	putExtentHeader(iblock, len(idx), extentsInInode, depth)
	for i, x := range idx {
		putIndex(iblock[extentHead+12*i:], x)
	}
	return used, nil
}
