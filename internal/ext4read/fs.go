// Package ext4read reads ext4 filesystem images in userspace, for images
// that someone untrusted wrote, such as a guest VM's writable disk. The
// host kernel never parses such an image: mounting it would hand a hostile
// filesystem to privileged code.
//
// The reader never writes. Every offset, length and count read from the
// image is checked against the image and the structure that holds it
// before use, allocations are bounded by the image size or by Options, and
// structures that could loop (extent trees, directory trees, the journal)
// have bounded walks. Checksums are not verified, except the journal's
// (they decide where its log ends): a hostile writer can forge them, so
// they prove nothing here.
//
// If the filesystem's journal needs recovery, the reader replays it in
// memory: it reads the filesystem that e2fsck would leave after replaying
// the journal, without changing the image.
package ext4read

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"
)

// RootIno is the inode number of the root directory.
const RootIno = 2

// Defaults for Options left zero.
const (
	DefaultMaxEntries = 1 << 20
	DefaultMaxDepth   = 512
)

// Options bound the work a hostile image can cause.
type Options struct {
	// MaxEntries caps the entries one directory may hold and the entries
	// one walk may visit (DefaultMaxEntries if 0).
	MaxEntries int
	// MaxDepth caps how many directories deep a walk descends
	// (DefaultMaxDepth if 0).
	MaxDepth int
}

// FS is an ext4 filesystem image opened for reading. Its methods are safe
// for concurrent use; a File or a Walker is not.
type FS struct {
	r    io.ReaderAt
	size int64
	opts Options
	sb   superblock

	// replay maps a filesystem block to the journal block that holds its
	// newest committed copy, when the journal needed recovery.
	replay map[uint64]journalCopy

	mu     sync.Mutex
	tables map[uint32]uint64 // group -> first block of its inode table
}

// ext4 on-disk constants.
const (
	superblockOffset = 1024
	superblockSize   = 1024
	ext4Magic        = 0xEF53

	compatHasJournal   = 0x4
	compatSparseSuper2 = 0x200

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompatExtents     = 0x40
	incompat64bit       = 0x80
	incompatMMP         = 0x100
	incompatFlexBG      = 0x200
	incompatEAInode     = 0x400
	incompatDirData     = 0x1000
	incompatCsumSeed    = 0x2000
	incompatLargeDir    = 0x4000
	incompatInlineData  = 0x8000
	incompatEncrypt     = 0x10000
	incompatCasefold    = 0x20000

	roCompatSparseSuper = 0x1
	roCompatHugeFile    = 0x8
	roCompatBigalloc    = 0x200
)

// incompatible features the reader handles; casefold only changes how
// the kernel compares names, and the reader takes names as stored.
const incompatSupported = incompatFiletype | incompatRecover | incompatMetaBG |
	incompatExtents | incompat64bit | incompatMMP | incompatFlexBG |
	incompatEAInode | incompatCsumSeed | incompatLargeDir | incompatCasefold

var incompatNames = map[uint32]string{
	incompatCompression: "compression",
	incompatJournalDev:  "journal_dev (an external journal device, not a filesystem)",
	incompatDirData:     "dirdata",
	incompatInlineData:  "inline_data",
	incompatEncrypt:     "encrypt",
}

type superblock struct {
	inodesCount    uint32
	blocksCount    uint64
	firstDataBlock uint64
	blockSize      int64
	blocksPerGroup uint64
	inodesPerGroup uint32
	inodeSize      int64
	firstIno       uint32
	compat         uint32
	incompat       uint32
	roCompat       uint32
	journalInum    uint32
	journalDev     uint32
	descSize       int64
	firstMetaBG    uint64
	backupBGs      [2]uint32
	groups         uint64
}

func (sb *superblock) has64bit() bool { return sb.incompat&incompat64bit != 0 }

// OpenFile opens the ext4 image file at path with Open. The file stays
// open for the FS; close it when done.
func OpenFile(path string, opts Options) (*FS, io.Closer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err == nil {
		var fs *FS
		if fs, err = Open(f, st.Size(), opts); err == nil {
			return fs, f, nil
		}
	}
	f.Close()
	return nil, nil, fmt.Errorf("reading %s: %w", path, err)
}

// Open reads the superblock of the ext4 image r, size bytes long, and
// replays its journal in memory if it needs recovery.
func Open(r io.ReaderAt, size int64, opts Options) (*FS, error) {
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	if opts.MaxDepth <= 0 {
		opts.MaxDepth = DefaultMaxDepth
	}
	fs := &FS{r: r, size: size, opts: opts, tables: map[uint32]uint64{}}
	raw := make([]byte, superblockSize)
	if size < superblockOffset+superblockSize {
		return nil, corrupt("image of %d bytes is too small for ext4", size)
	}
	if _, err := r.ReadAt(raw, superblockOffset); err != nil {
		return nil, fmt.Errorf("reading superblock: %w", err)
	}
	if err := fs.sb.parse(raw, size); err != nil {
		return nil, fmt.Errorf("superblock: %w", err)
	}
	if fs.sb.incompat&incompatRecover == 0 {
		return fs, nil
	}
	if err := fs.loadJournal(); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if len(fs.replay) == 0 {
		return fs, nil
	}
	// The journal may hold newer copies of the superblock and group
	// descriptors: read them again through it.
	b := make([]byte, fs.sb.blockSize)
	sbBlock := uint64(superblockOffset / fs.sb.blockSize)
	if err := fs.readBlock(sbBlock, b); err != nil {
		return nil, fmt.Errorf("reading superblock: %w", err)
	}
	off, bs := superblockOffset%fs.sb.blockSize, fs.sb.blockSize
	if err := fs.sb.parse(b[off:off+superblockSize], size); err != nil {
		return nil, fmt.Errorf("superblock after journal replay: %w", err)
	}
	if fs.sb.blockSize != bs {
		// The replay map counts in the old block size.
		return nil, corrupt("the journal changes the block size")
	}
	clear(fs.tables)
	return fs, nil
}

func (sb *superblock) parse(b []byte, imageSize int64) error {
	le := binary.LittleEndian
	if le.Uint16(b[0x38:]) != ext4Magic {
		return corrupt("bad magic: not an ext2/3/4 filesystem")
	}
	*sb = superblock{
		inodesCount:    le.Uint32(b[0x0:]),
		blocksCount:    uint64(le.Uint32(b[0x4:])),
		firstDataBlock: uint64(le.Uint32(b[0x14:])),
		blocksPerGroup: uint64(le.Uint32(b[0x20:])),
		inodesPerGroup: le.Uint32(b[0x28:]),
		compat:         le.Uint32(b[0x5C:]),
		incompat:       le.Uint32(b[0x60:]),
		roCompat:       le.Uint32(b[0x64:]),
		journalInum:    le.Uint32(b[0xE0:]),
		journalDev:     le.Uint32(b[0xE4:]),
		firstMetaBG:    uint64(le.Uint32(b[0x104:])),
		backupBGs:      [2]uint32{le.Uint32(b[0x24C:]), le.Uint32(b[0x250:])},
	}
	logBlock := le.Uint32(b[0x18:])
	if logBlock > 6 {
		return corrupt("block size 1024<<%d is out of range (1 KiB to 64 KiB)", logBlock)
	}
	sb.blockSize = 1024 << logBlock
	if le.Uint32(b[0x4C:]) == 0 { // revision 0: fixed inode size
		sb.inodeSize, sb.firstIno = 128, 11
	} else {
		sb.inodeSize, sb.firstIno = int64(le.Uint16(b[0x58:])), le.Uint32(b[0x54:])
	}
	if err := sb.checkFeatures(); err != nil {
		return err
	}
	if sb.has64bit() {
		sb.blocksCount |= uint64(le.Uint32(b[0x150:])) << 32
		sb.descSize = int64(le.Uint16(b[0xFE:]))
		if sb.descSize < 64 || sb.descSize > 1024 || sb.descSize&(sb.descSize-1) != 0 {
			return corrupt("group descriptor size %d is invalid", sb.descSize)
		}
	} else {
		sb.descSize = 32
	}
	bs := sb.blockSize
	switch {
	case sb.inodeSize < 128 || sb.inodeSize > bs || sb.inodeSize&(sb.inodeSize-1) != 0:
		return corrupt("inode size %d is invalid", sb.inodeSize)
	case (bs == 1024) != (sb.firstDataBlock == 1) || sb.firstDataBlock > 1:
		return corrupt("first data block %d does not fit block size %d", sb.firstDataBlock, bs)
	case sb.blocksPerGroup < 8 || sb.blocksPerGroup > uint64(bs)*8:
		return corrupt("%d blocks per group is invalid", sb.blocksPerGroup)
	case sb.inodesPerGroup < uint32(bs/sb.inodeSize) || uint64(sb.inodesPerGroup) > uint64(bs)*8:
		return corrupt("%d inodes per group is invalid", sb.inodesPerGroup)
	case sb.blocksCount <= sb.firstDataBlock:
		return corrupt("block count %d is invalid", sb.blocksCount)
	case sb.blocksCount > uint64(imageSize/bs):
		return corrupt("filesystem of %d blocks of %d bytes is larger than the %d-byte image",
			sb.blocksCount, bs, imageSize)
	}
	sb.groups = (sb.blocksCount - sb.firstDataBlock + sb.blocksPerGroup - 1) / sb.blocksPerGroup
	if uint64(sb.inodesCount) > sb.groups*uint64(sb.inodesPerGroup) {
		return corrupt("%d inodes do not fit %d groups of %d", sb.inodesCount, sb.groups, sb.inodesPerGroup)
	}
	if sb.firstIno < 11 || sb.firstIno > sb.inodesCount {
		return corrupt("first inode %d is invalid", sb.firstIno)
	}
	if sb.incompat&incompatMetaBG != 0 && sb.firstMetaBG > sb.groups {
		return corrupt("first meta block group %d is past the last group", sb.firstMetaBG)
	}
	return nil
}

func (sb *superblock) checkFeatures() error {
	if bad := sb.incompat &^ incompatSupported; bad != 0 {
		for bit := uint32(1); bit != 0; bit <<= 1 {
			if bad&bit == 0 {
				continue
			}
			if name, ok := incompatNames[bit]; ok {
				return unsupported("feature %s", name)
			}
			return unsupported("unknown incompatible feature 0x%x", bit)
		}
	}
	// Unknown read-only-compatible features still allow reading, by
	// definition; bigalloc changes block accounting the reader has not
	// been checked against.
	if sb.roCompat&roCompatBigalloc != 0 {
		return unsupported("feature bigalloc")
	}
	return nil
}

// readBlock reads filesystem block blk into b (len(b) == block size),
// through the journal's replay map.
func (fs *FS) readBlock(blk uint64, b []byte) error {
	return fs.readBlocks(blk, 0, b)
}

// readBlocks reads len(b) bytes starting off bytes into block blk; they
// may span blocks. Blocks the journal replays are read from the journal.
func (fs *FS) readBlocks(blk uint64, off int64, b []byte) error {
	bs := fs.sb.blockSize
	if off < 0 || off >= bs {
		return corrupt("offset %d into block %d is invalid", off, blk)
	}
	nblocks := (uint64(off) + uint64(len(b)) + uint64(bs) - 1) / uint64(bs)
	if blk >= fs.sb.blocksCount || nblocks > fs.sb.blocksCount-blk {
		return corrupt("blocks %d+%d are past the end of the filesystem (%d blocks)",
			blk, nblocks, fs.sb.blocksCount)
	}
	if len(fs.replay) == 0 {
		return fs.readImage(b, int64(blk)*bs+off)
	}
	for len(b) > 0 {
		n := min(int64(len(b)), bs-off)
		if c, ok := fs.replay[blk]; ok {
			if err := fs.readImage(b[:n], int64(c.block)*bs+off); err != nil {
				return err
			}
			if c.escaped {
				// The journal stored the block with its first four
				// bytes cleared because they looked like its magic.
				for i := off; i < 4 && i < off+n; i++ {
					b[i-off] = jbd2MagicBytes[i]
				}
			}
		} else if err := fs.readImage(b[:n], int64(blk)*bs+off); err != nil {
			return err
		}
		b, blk, off = b[n:], blk+1, 0
	}
	return nil
}

func (fs *FS) readImage(b []byte, off int64) error {
	if off < 0 || off > fs.size || int64(len(b)) > fs.size-off {
		return corrupt("read of %d bytes at %d is past the end of the image", len(b), off)
	}
	if _, err := fs.r.ReadAt(b, off); err != nil {
		return fmt.Errorf("reading image at %d: %w", off, err)
	}
	return nil
}

// hasSuper reports whether group g holds a superblock backup (and, without
// meta_bg, a copy of the group descriptors).
func (sb *superblock) hasSuper(g uint64) bool {
	if g == 0 {
		return true
	}
	if sb.compat&compatSparseSuper2 != 0 {
		return g == uint64(sb.backupBGs[0]) || g == uint64(sb.backupBGs[1])
	}
	if g == 1 || sb.roCompat&roCompatSparseSuper == 0 {
		return true
	}
	if g%2 == 0 {
		return false
	}
	for _, p := range []uint64{3, 5, 7} {
		n := p
		for n < g {
			n *= p
		}
		if n == g {
			return true
		}
	}
	return false
}

// descBlock returns the block holding descriptor block d: right after
// the superblock, or with meta_bg from s_first_meta_bg on, at the start of
// the first group of meta group d (after its superblock backup).
func (sb *superblock) descBlock(d uint64) uint64 {
	if sb.incompat&incompatMetaBG == 0 || d < sb.firstMetaBG {
		return sb.firstDataBlock + 1 + d
	}
	g := d * uint64(sb.blockSize/sb.descSize)
	blk := sb.firstDataBlock + g*sb.blocksPerGroup
	if sb.hasSuper(g) {
		blk++
	}
	return blk
}

// inodeTable returns the first block of group g's inode table.
func (fs *FS) inodeTable(g uint32) (uint64, error) {
	fs.mu.Lock()
	t, ok := fs.tables[g]
	fs.mu.Unlock()
	if ok {
		return t, nil
	}
	sb := &fs.sb
	perBlock := uint64(sb.blockSize / sb.descSize)
	d := uint64(g) / perBlock
	b := make([]byte, sb.descSize)
	if err := fs.readBlocks(sb.descBlock(d), int64(uint64(g)%perBlock)*sb.descSize, b); err != nil {
		return 0, fmt.Errorf("group %d descriptor: %w", g, err)
	}
	le := binary.LittleEndian
	t = uint64(le.Uint32(b[0x8:]))
	if sb.has64bit() {
		t |= uint64(le.Uint32(b[0x28:])) << 32
	}
	tableBlocks := (uint64(sb.inodesPerGroup)*uint64(sb.inodeSize) + uint64(sb.blockSize) - 1) / uint64(sb.blockSize)
	if t < sb.firstDataBlock || t >= sb.blocksCount || tableBlocks > sb.blocksCount-t {
		return 0, corrupt("group %d: inode table at block %d is outside the filesystem", g, t)
	}
	fs.mu.Lock()
	fs.tables[g] = t
	fs.mu.Unlock()
	return t, nil
}

// rawInode reads inode ino's on-disk bytes.
func (fs *FS) rawInode(ino uint32) ([]byte, error) {
	sb := &fs.sb
	if ino == 0 || ino > sb.inodesCount {
		return nil, corrupt("inode number %d is out of range (1-%d)", ino, sb.inodesCount)
	}
	g, idx := (ino-1)/sb.inodesPerGroup, (ino-1)%sb.inodesPerGroup
	t, err := fs.inodeTable(g)
	if err != nil {
		return nil, err
	}
	off := int64(idx) * sb.inodeSize
	b := make([]byte, sb.inodeSize)
	if err := fs.readBlocks(t+uint64(off/sb.blockSize), off%sb.blockSize, b); err != nil {
		return nil, err
	}
	return b, nil
}

// BlockSize returns the filesystem's block size in bytes.
func (fs *FS) BlockSize() int64 { return fs.sb.blockSize }

// Root returns the root directory's inode number.
func (fs *FS) Root() uint32 { return RootIno }
