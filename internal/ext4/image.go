package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Image reads an ext4 image just enough for the builder: the directories,
// to map the names it staged to the inode numbers mke2fs gave them, and
// the inodes and where their blocks are. It never writes.
type Image struct {
	f             *os.File
	owned         bool  // opened by OpenImage, closed by Close
	cached        int64 // offset of the inode table block in cache, -1 if none
	cache         []byte
	blockSize     int64
	inodeSize     int64
	inodesPerGrp  uint32
	InodeCount    uint32
	inodeTables   []int64 // first block of each group's inode table
	incompat64bit bool
}

// Superblock and feature constants from the ext4 disk layout.
const (
	superblockOffset  = 1024
	ext4Magic         = 0xEF53
	incompatExtents   = 0x40
	incompat64bit     = 0x80
	incompatInline    = 0x8000
	inodeFlagExtents  = 0x80000
	extentMagic       = 0xF30A
	uninitExtentLen   = 32768
	rootInode         = 2
	maxExtentTreeSize = 5
)

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
	Type uint8 // ext4 file type code
}

// OpenImage opens an ext4 image file for reading its directories.
func OpenImage(path string) (*Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	im, err := readImage(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	im.owned = true
	return im, nil
}

func readImage(f *os.File) (*Image, error) {
	im := &Image{f: f, cached: -1}
	if err := im.readSuperblock(); err != nil {
		return nil, err
	}
	return im, nil
}

// Close releases the image file.
func (im *Image) Close() error {
	if !im.owned {
		return nil
	}
	return im.f.Close()
}

func (im *Image) readSuperblock() error {
	sb := make([]byte, 1024)
	if _, err := im.f.ReadAt(sb, superblockOffset); err != nil {
		return fmt.Errorf("reading superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != ext4Magic {
		return errors.New("not an ext4 filesystem")
	}
	im.InodeCount = le.Uint32(sb[0x0:])
	firstDataBlock := int64(le.Uint32(sb[0x14:]))
	im.blockSize = 1024 << le.Uint32(sb[0x18:])
	blocksPerGroup := int64(le.Uint32(sb[0x20:]))
	im.inodesPerGrp = le.Uint32(sb[0x28:])
	im.inodeSize = int64(le.Uint16(sb[0x58:]))
	incompat := le.Uint32(sb[0x60:])
	if incompat&incompatExtents == 0 {
		return errors.New("filesystem does not use extents")
	}
	if incompat&incompatInline != 0 {
		return errors.New("inline data is not supported")
	}
	im.incompat64bit = incompat&incompat64bit != 0
	descSize := int64(32)
	if im.incompat64bit {
		descSize = int64(le.Uint16(sb[0xFE:]))
	}
	blocks := int64(le.Uint32(sb[0x4:]))
	if im.incompat64bit {
		blocks |= int64(le.Uint32(sb[0x150:])) << 32
	}
	if blocksPerGroup == 0 || im.inodesPerGrp == 0 || im.inodeSize < 128 || im.inodeSize > im.blockSize {
		return errors.New("corrupt superblock")
	}
	groups := (blocks - firstDataBlock + blocksPerGroup - 1) / blocksPerGroup
	gdt := make([]byte, groups*descSize)
	if _, err := im.f.ReadAt(gdt, (firstDataBlock+1)*im.blockSize); err != nil {
		return fmt.Errorf("reading group descriptors: %w", err)
	}
	im.inodeTables = make([]int64, groups)
	for g := int64(0); g < groups; g++ {
		d := gdt[g*descSize:]
		table := int64(le.Uint32(d[0x8:]))
		if descSize >= 64 {
			table |= int64(le.Uint32(d[0x28:])) << 32
		}
		im.inodeTables[g] = table
	}
	return nil
}

// inode returns the raw bytes of an inode.
func (im *Image) inode(ino uint32) ([]byte, error) {
	if ino == 0 || ino > im.InodeCount {
		return nil, fmt.Errorf("inode %d out of range", ino)
	}
	g := (ino - 1) / im.inodesPerGrp
	off := im.inodeTables[g]*im.blockSize + int64((ino-1)%im.inodesPerGrp)*im.inodeSize
	// Inodes are read in number order: read their table a block at a
	// time.
	block := off / im.blockSize * im.blockSize
	if block != im.cached {
		if im.cache == nil {
			im.cache = make([]byte, im.blockSize)
		}
		im.cached = -1
		if _, err := im.f.ReadAt(im.cache, block); err != nil {
			return nil, fmt.Errorf("reading inode %d: %w", ino, err)
		}
		im.cached = block
	}
	buf := make([]byte, im.inodeSize)
	copy(buf, im.cache[off-block:])
	return buf, nil
}

// inodeFields are the fields of an on-disk inode that the metadata script
// sets.
type inodeFields struct {
	mode                uint16
	uid, gid            uint32
	size                uint64
	atime, mtime, ctime rawTime
}

// rawTime is an on-disk timestamp: the seconds field and, in large inodes,
// the extra field (nanoseconds and epoch bits).
type rawTime struct {
	lo, extra uint32
	hasExtra  bool
}

// decodeInode reads the fields the metadata script sets from a raw inode
// (see the ext4 disk layout: the osd2 area holds the high halves of the
// ids, the large-inode area the extra time fields).
func decodeInode(raw []byte) inodeFields {
	le := binary.LittleEndian
	f := inodeFields{
		mode:  le.Uint16(raw[0x00:]),
		uid:   uint32(le.Uint16(raw[0x02:])) | uint32(le.Uint16(raw[0x78:]))<<16,
		gid:   uint32(le.Uint16(raw[0x18:])) | uint32(le.Uint16(raw[0x7A:]))<<16,
		size:  uint64(le.Uint32(raw[0x04:])) | uint64(le.Uint32(raw[0x6C:]))<<32,
		atime: rawTime{lo: le.Uint32(raw[0x08:])},
		ctime: rawTime{lo: le.Uint32(raw[0x0C:])},
		mtime: rawTime{lo: le.Uint32(raw[0x10:])},
	}
	// The extra fields exist when the inode says its large part reaches
	// past them.
	if len(raw) > 0x90 {
		extra := int(le.Uint16(raw[0x80:]))
		for _, t := range []struct {
			f   *rawTime
			off int
		}{{&f.ctime, 0x84}, {&f.mtime, 0x88}, {&f.atime, 0x8C}} {
			if 0x80+extra >= t.off+4 {
				t.f.extra, t.f.hasExtra = le.Uint32(raw[t.off:]), true
			}
		}
	}
	return f
}

// extent is a run of file blocks stored contiguously.
type extent struct {
	logical  int64
	physical int64
	length   int64
	uninit   bool // allocated but not written: reads as zeros
}

// extents returns the data extents of an inode, in file order.
func (im *Image) extents(ino uint32, raw []byte) ([]extent, error) {
	if binary.LittleEndian.Uint32(raw[0x20:])&inodeFlagExtents == 0 {
		return nil, fmt.Errorf("inode %d does not use extents", ino)
	}
	var out []extent
	var walk func(node []byte, depth int) error
	walk = func(node []byte, depth int) error {
		le := binary.LittleEndian
		if len(node) < 12 || le.Uint16(node[0:]) != extentMagic {
			return fmt.Errorf("inode %d: bad extent header", ino)
		}
		entries := int(le.Uint16(node[2:]))
		treeDepth := int(le.Uint16(node[6:]))
		if depth > maxExtentTreeSize || 12+entries*12 > len(node) {
			return fmt.Errorf("inode %d: corrupt extent tree", ino)
		}
		for i := 0; i < entries; i++ {
			e := node[12+i*12:]
			if treeDepth == 0 {
				length := int64(le.Uint16(e[4:]))
				uninit := length > uninitExtentLen
				if uninit {
					length -= uninitExtentLen
				}
				out = append(out, extent{
					logical:  int64(le.Uint32(e[0:])),
					physical: int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:])),
					length:   length,
					uninit:   uninit,
				})
				continue
			}
			leaf := int64(le.Uint16(e[8:]))<<32 | int64(le.Uint32(e[4:]))
			child := make([]byte, im.blockSize)
			if _, err := im.f.ReadAt(child, leaf*im.blockSize); err != nil {
				return fmt.Errorf("inode %d: reading extent block: %w", ino, err)
			}
			if err := walk(child, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	return out, walk(raw[0x28:0x28+60], 0)
}

// ReadDir lists a directory, "." and ".." excluded.
func (im *Image) ReadDir(ino uint32) ([]DirEntry, error) {
	raw, err := im.inode(ino)
	if err != nil {
		return nil, err
	}
	if binary.LittleEndian.Uint16(raw[0:])&0xF000 != 0x4000 {
		return nil, fmt.Errorf("inode %d is not a directory", ino)
	}
	exts, err := im.extents(ino, raw)
	if err != nil {
		return nil, err
	}
	var out []DirEntry
	block := make([]byte, im.blockSize)
	for _, e := range exts {
		for b := int64(0); b < e.length; b++ {
			if _, err := im.f.ReadAt(block, (e.physical+b)*im.blockSize); err != nil && err != io.EOF {
				return nil, fmt.Errorf("directory %d: %w", ino, err)
			}
			// A linear scan also covers hashed directories: their
			// index blocks look like one unused entry spanning the
			// block, and checksum tails have inode 0.
			for off := 0; off+8 <= len(block); {
				le := binary.LittleEndian
				dino := le.Uint32(block[off:])
				recLen := int(le.Uint16(block[off+4:]))
				nameLen := int(block[off+6])
				if recLen < 8 || off+recLen > len(block) || 8+nameLen > recLen {
					return nil, fmt.Errorf("directory %d: corrupt entry at block %d offset %d", ino, e.logical+b, off)
				}
				if dino != 0 {
					name := string(block[off+8 : off+8+nameLen])
					if name != "." && name != ".." {
						out = append(out, DirEntry{Name: name, Ino: dino, Type: block[off+7]})
					}
				}
				off += recLen
			}
		}
	}
	return out, nil
}

// Lookup finds the entry at an absolute path without following symlinks,
// returning its inode number and file type (ok false if it is not there).
func (im *Image) Lookup(path string) (ino uint32, fileType uint8, ok bool, err error) {
	ino, fileType = rootInode, 2
	for _, name := range strings.Split(strings.Trim(path, "/"), "/") {
		if name == "" {
			continue
		}
		if fileType != 2 {
			return 0, 0, false, nil
		}
		ents, err := im.ReadDir(ino)
		if err != nil {
			return 0, 0, false, err
		}
		found := false
		for _, e := range ents {
			if e.Name == name {
				ino, fileType, found = e.Ino, e.Type, true
				break
			}
		}
		if !found {
			return 0, 0, false, nil
		}
	}
	return ino, fileType, true, nil
}
