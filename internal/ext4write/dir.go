package ext4write

import (
	"encoding/binary"
	"fmt"
	"sort"
)

// dirent is one name in a directory.
type dirent struct {
	name  string
	ino   uint32
	ftype uint8
}

// ext4 directory entry file types.
const (
	ftReg     = 1
	ftDir     = 2
	ftChar    = 3
	ftBlock   = 4
	ftFifo    = 5
	ftSymlink = 7
)

const (
	direntHead = 8  // inode, rec_len, name_len, file_type
	dirTail    = 12 // the checksum entry that ends each leaf block
	// usable is the room for entries in a leaf block.
	usable = blockSize - dirTail
	// dxRootLimit and dxNodeLimit are how many index entries fit in the
	// hashed directory's root and interior blocks, less the checksum tail.
	dxRootLimit = (blockSize - 0x20 - 8) / 8
	dxNodeLimit = (blockSize - 0x8 - 8) / 8

	hashHalfMD4 = 1
)

func direntSize(name string) int { return direntHead + pad4(len(name)) }

// dirBuilder lays out directories for one filesystem.
type dirBuilder struct {
	fsSeed   uint32
	hashSeed [4]uint32
}

// build returns a directory's blocks in logical order and whether it is
// hashed. Names fitting one block make a plain directory; more make a
// hashed one (htree), as the kernel would have made it while growing.
func (d *dirBuilder) build(ino, parent uint32, ents []dirent) (blocks [][]byte, indexed bool, err error) {
	seed := inodeSeed(d.fsSeed, ino, 0)
	total := direntSize(".") + direntSize("..")
	for _, e := range ents {
		total += direntSize(e.name)
	}
	if total <= usable {
		b := make([]byte, blockSize)
		all := append([]dirent{{".", ino, ftDir}, {"..", parent, ftDir}}, ents...)
		fillLeaf(b, all)
		leafTail(b, seed)
		return [][]byte{b}, false, nil
	}
	blocks, err = d.htree(ino, parent, ents, seed)
	return blocks, true, err
}

// fillLeaf writes entries into a leaf block; the last one's record
// stretches to the checksum tail.
func fillLeaf(b []byte, ents []dirent) {
	le := binary.LittleEndian
	pos := 0
	for i, e := range ents {
		size := direntSize(e.name)
		if i == len(ents)-1 {
			size = usable - pos
		}
		le.PutUint32(b[pos:], e.ino)
		le.PutUint16(b[pos+4:], uint16(size))
		b[pos+6] = uint8(len(e.name))
		b[pos+7] = e.ftype
		copy(b[pos+direntHead:], e.name)
		pos += size
	}
}

// leafTail writes the checksum entry at the end of a leaf block.
func leafTail(b []byte, seed uint32) {
	le := binary.LittleEndian
	t := b[usable:]
	le.PutUint32(t[0:], 0)
	le.PutUint16(t[4:], dirTail)
	t[6] = 0
	t[7] = 0xDE
	le.PutUint32(t[8:], crc32c(seed, b[:usable]))
}

type hashed struct {
	dirent
	hash uint32
}

type dxEntry struct {
	hash  uint32
	block uint32
}

// htree lays out a hashed directory: block 0 is the root (".", ".." and
// the index), then the interior index blocks if one level is not enough,
// then the leaves, filled in hash order.
func (d *dirBuilder) htree(ino, parent uint32, ents []dirent, seed uint32) ([][]byte, error) {
	hs := make([]hashed, len(ents))
	for i, e := range ents {
		hs[i] = hashed{e, dirHash([]byte(e.name), d.hashSeed)}
	}
	sort.Slice(hs, func(i, j int) bool {
		if hs[i].hash != hs[j].hash {
			return hs[i].hash < hs[j].hash
		}
		return hs[i].name < hs[j].name
	})
	// Cut the names into leaves, each starting with its lowest hash; a
	// leaf that starts with the hash the previous one ended with has the
	// collision bit set, telling lookups to look back.
	var leaves [][]dirent
	var index []dxEntry
	for i := 0; i < len(hs); {
		start, pos := i, 0
		for i < len(hs) && pos+direntSize(hs[i].name) <= usable {
			pos += direntSize(hs[i].name)
			i++
		}
		leaf := make([]dirent, 0, i-start)
		for _, h := range hs[start:i] {
			leaf = append(leaf, h.dirent)
		}
		h := hs[start].hash
		if start > 0 && hs[start-1].hash == h {
			h |= 1
		}
		leaves = append(leaves, leaf)
		index = append(index, dxEntry{hash: h})
	}
	nodes := 0
	if len(leaves) > dxRootLimit {
		nodes = (len(leaves) + dxNodeLimit - 1) / dxNodeLimit
		if nodes > dxRootLimit {
			return nil, fmt.Errorf("directory of %d names is too large for a two-level index", len(ents))
		}
	}
	blocks := make([][]byte, 1+nodes+len(leaves))
	for i, leaf := range leaves {
		b := make([]byte, blockSize)
		fillLeaf(b, leaf)
		leafTail(b, seed)
		blocks[1+nodes+i] = b
		index[i].block = uint32(1 + nodes + i)
	}
	root := make([]byte, blockSize)
	le := binary.LittleEndian
	le.PutUint32(root[0:], ino)
	le.PutUint16(root[4:], 12)
	root[6], root[7] = 1, ftDir
	copy(root[8:], ".")
	le.PutUint32(root[12:], parent)
	le.PutUint16(root[16:], blockSize-12)
	root[18], root[19] = 2, ftDir
	copy(root[20:], "..")
	root[0x18+4] = hashHalfMD4
	root[0x18+5] = 8 // info length
	if nodes == 0 {
		putDx(root, 0x20, dxRootLimit, index, seed)
	} else {
		root[0x18+6] = 1 // indirect levels
		top := make([]dxEntry, nodes)
		for n := 0; n < nodes; n++ {
			part := index[n*dxNodeLimit : min((n+1)*dxNodeLimit, len(index))]
			b := make([]byte, blockSize)
			le.PutUint16(b[4:], blockSize) // an empty entry spanning the block
			putDx(b, 0x8, dxNodeLimit, part, seed)
			blocks[1+n] = b
			top[n] = dxEntry{hash: part[0].hash, block: uint32(1 + n)}
		}
		putDx(root, 0x20, dxRootLimit, top, seed)
	}
	blocks[0] = root
	return blocks, nil
}

// putDx writes an index (limit, count, then hash and block pairs; the
// first pair's hash slot holds limit and count) at off, and the checksum
// tail after the limit's last slot.
func putDx(b []byte, off, limit int, ents []dxEntry, seed uint32) {
	le := binary.LittleEndian
	le.PutUint16(b[off:], uint16(limit))
	le.PutUint16(b[off+2:], uint16(len(ents)))
	for i, e := range ents {
		p := off + 8*i
		if i > 0 {
			le.PutUint32(b[p:], e.hash)
		}
		le.PutUint32(b[p+4:], e.block)
	}
	tail := off + 8*limit
	c := crc32c(seed, b[:off+8*len(ents)])
	c = crc32c(c, b[tail:tail+4]) // dt_reserved
	c = crc32c(c, zeros[:4])
	le.PutUint32(b[tail+4:], c)
}
