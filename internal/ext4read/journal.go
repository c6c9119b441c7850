package ext4read

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// The journal (jbd2) is big-endian. When the filesystem says it needs
// recovery, the reader does what e2fsck's replay does, in memory: it scans
// the log from its start for complete transactions (a run of blocks with
// the expected sequence number, ending with a valid commit block), drops
// blocks revoked by a transaction as new or newer than the one that
// logged them, and maps every other logged filesystem block to its newest
// copy in the log.

const (
	jbd2Magic = 0xC03B3998

	jbd2Descriptor = 1
	jbd2Commit     = 2
	jbd2SuperV1    = 3
	jbd2SuperV2    = 4
	jbd2Revoke     = 5

	jbd2CompatChecksum     = 0x1
	jbd2IncompatRevoke     = 0x1
	jbd2Incompat64bit      = 0x2
	jbd2IncompatAsync      = 0x4
	jbd2IncompatCsumV2     = 0x8
	jbd2IncompatCsumV3     = 0x10
	jbd2IncompatFastCommit = 0x20

	jbd2FlagEscape   = 0x1
	jbd2FlagSameUUID = 0x2
	jbd2FlagLastTag  = 0x8

	jbd2CRC32Type   = 1 // commit block checksum of the v1 checksum feature
	jbd2CRC32CType  = 4 // superblock checksum type of csum v2/v3
	jbd2HeaderSize  = 12
	jbd2TailSize    = 4 // descriptor and revoke block checksum tail
	jbd2RevokeStart = 16
)

var jbd2MagicBytes = [4]byte{0xC0, 0x3B, 0x39, 0x98}

// journalCopy is where the journal holds a filesystem block's replayed
// copy.
type journalCopy struct {
	block   uint64 // filesystem block of the journal copy
	escaped bool   // its first four bytes must read as the journal magic
}

type journal struct {
	fs       *FS
	m        blockMapper
	first    uint64 // first log block
	last     uint64 // one past the last log block
	incompat uint32
	compat   uint32
	seed     uint32 // crc32c of the journal UUID, for csum v2/v3
	tagBytes int
	tail     int    // checksum tail size of descriptor and revoke blocks
	data     []byte // scratch buffer for logged blocks
}

func (j *journal) csum() bool { return j.incompat&(jbd2IncompatCsumV2|jbd2IncompatCsumV3) != 0 }

// read reads log block n into b and returns the filesystem block it is in.
func (j *journal) read(n uint64, b []byte) (uint64, error) {
	r, err := j.m.runAt(n)
	if err != nil {
		return 0, fmt.Errorf("log block %d: %w", n, err)
	}
	if r.zero {
		return 0, corrupt("log block %d is not allocated", n)
	}
	if err := j.fs.readBlock(r.pblk, b); err != nil {
		return 0, fmt.Errorf("log block %d: %w", n, err)
	}
	return r.pblk, nil
}

func (j *journal) wrap(n uint64) uint64 {
	if n >= j.last {
		n -= j.last - j.first
	}
	return n
}

type journalTag struct {
	fsBlock  uint64
	logBlock uint64
	flags    uint32
	csum     uint32
}

type transaction struct {
	seq  uint32
	tags []journalTag
}

// loadJournal builds fs.replay from the internal journal. It reads the
// image as it is: journal blocks are never themselves journaled.
func (fs *FS) loadJournal() error {
	sb := &fs.sb
	if sb.compat&compatHasJournal == 0 {
		// e2fsck clears a recovery flag without a journal.
		return nil
	}
	if sb.journalInum == 0 || sb.journalDev != 0 {
		return unsupported("an external journal")
	}
	in, err := fs.Inode(sb.journalInum)
	if err != nil {
		return err
	}
	j := &journal{fs: fs, m: fs.mapper(in)}
	bs := sb.blockSize
	b := make([]byte, bs)
	if _, err := j.read(0, b); err != nil {
		return fmt.Errorf("superblock: %w", err)
	}
	be := binary.BigEndian
	if be.Uint32(b) != jbd2Magic || (be.Uint32(b[4:]) != jbd2SuperV1 && be.Uint32(b[4:]) != jbd2SuperV2) {
		return corrupt("journal superblock has a bad magic number")
	}
	if int64(be.Uint32(b[0xC:])) != bs {
		return corrupt("journal block size %d differs from the filesystem's", be.Uint32(b[0xC:]))
	}
	maxLen, start := uint64(be.Uint32(b[0x10:])), uint64(be.Uint32(b[0x1C:]))
	j.first, j.last = uint64(be.Uint32(b[0x14:])), maxLen
	seq := be.Uint32(b[0x18:])
	if maxLen > uint64(in.Size/bs) {
		return corrupt("journal of %d blocks does not fit its %d-byte inode", maxLen, in.Size)
	}
	if j.first == 0 || j.first >= j.last {
		return corrupt("journal first block %d is invalid", j.first)
	}
	if start == 0 {
		return nil // the log is empty: nothing to replay
	}
	if start < j.first || start >= j.last {
		return corrupt("journal start %d is outside the log", start)
	}
	if be.Uint32(b[4:]) == jbd2SuperV2 {
		j.compat, j.incompat = be.Uint32(b[0x24:]), be.Uint32(b[0x28:])
	}
	const known = jbd2IncompatRevoke | jbd2Incompat64bit | jbd2IncompatAsync |
		jbd2IncompatCsumV2 | jbd2IncompatCsumV3
	switch {
	case j.incompat&jbd2IncompatFastCommit != 0:
		return unsupported("journal fast commits")
	case j.incompat&^known != 0:
		return unsupported("journal feature 0x%x", j.incompat&^known)
	case j.incompat&jbd2IncompatCsumV2 != 0 && j.incompat&jbd2IncompatCsumV3 != 0:
		return corrupt("journal claims both checksum versions")
	}
	if j.csum() {
		if b[0x50] != jbd2CRC32CType {
			return unsupported("journal checksum type %d", b[0x50])
		}
		want := be.Uint32(b[0xFC:])
		if crc32cBlock(^uint32(0), b[:1024], 0xFC) != want {
			return corrupt("journal superblock checksum mismatch")
		}
		j.seed = crc32cRaw(^uint32(0), b[0x30:0x40])
		j.tail = jbd2TailSize
	}
	switch {
	case j.incompat&jbd2IncompatCsumV3 != 0:
		j.tagBytes = 16
	case j.incompat&jbd2IncompatCsumV2 != 0:
		j.tagBytes = 10
	default:
		j.tagBytes = 8
	}
	if j.incompat&jbd2Incompat64bit != 0 && j.incompat&jbd2IncompatCsumV3 == 0 {
		j.tagBytes += 4
	}
	txns, revoked, err := j.scan(start, seq)
	if err != nil {
		return err
	}
	return j.replayMap(txns, revoked)
}

// scan reads the log from start and returns its complete transactions,
// oldest first, and the revoke table (block -> newest revoking sequence).
func (j *journal) scan(start uint64, seq uint32) ([]transaction, map[uint64]uint32, error) {
	be := binary.BigEndian
	bs := int(j.fs.sb.blockSize)
	b := make([]byte, bs)
	v1 := j.compat&jbd2CompatChecksum != 0
	var (
		done       []transaction
		revoked    = map[uint64]uint32{}
		cur        = transaction{seq: seq}
		curRevokes = map[uint64]bool{}
		revokeErr  error  // a bad revoke block matters only if committed
		lastCommit uint64 // commit time of the last complete transaction
		badCsum    bool   // a descriptor or revoke block failed its checksum
		crc        = ^uint32(0)
	)
	// A log is at most one lap of the journal; a longer one is a loop.
	next, budget := start, j.last-j.first
	advance := func() error {
		if budget == 0 {
			return corrupt("journal log never ends")
		}
		budget--
		next = j.wrap(next + 1)
		return nil
	}
	for {
		if _, err := j.read(next, b); err != nil {
			return nil, nil, err
		}
		if err := advance(); err != nil {
			return nil, nil, err
		}
		if be.Uint32(b) != jbd2Magic || be.Uint32(b[8:]) != cur.seq {
			return done, revoked, nil
		}
		switch be.Uint32(b[4:]) {
		case jbd2Descriptor:
			badCsum = badCsum || (j.csum() && !j.tailValid(b))
			if v1 {
				crc = crc32BE(crc, b)
			}
			for off := jbd2HeaderSize; off+j.tagBytes <= bs-j.tail; {
				t := j.parseTag(b[off:])
				t.logBlock = next
				cur.tags = append(cur.tags, t)
				if v1 {
					if _, err := j.read(next, j.scratch()); err != nil {
						return nil, nil, err
					}
					crc = crc32BE(crc, j.data)
				}
				if err := advance(); err != nil {
					return nil, nil, err
				}
				off += j.tagBytes
				if t.flags&jbd2FlagSameUUID == 0 {
					off += 16
				}
				if t.flags&jbd2FlagLastTag != 0 {
					break
				}
			}
		case jbd2Revoke:
			badCsum = badCsum || (j.csum() && !j.tailValid(b))
			if err := j.parseRevoke(b, curRevokes); err != nil && revokeErr == nil {
				revokeErr = err
			}
		case jbd2Commit:
			commitTime := be.Uint64(b[0x30:])
			if badCsum {
				// If this commit is older than the last one, the block
				// is left over from an earlier lap and the log ends
				// here; if not, the log is damaged and e2fsck refuses
				// to replay it.
				if commitTime >= lastCommit {
					return nil, nil, corrupt("journal transaction %d fails its checksum", cur.seq)
				}
				return done, revoked, nil
			}
			valid := true
			if v1 {
				typ, size, sum := b[12], b[13], be.Uint32(b[16:])
				valid = (typ == jbd2CRC32Type && size == 4 && sum == crc) || (typ == 0 && size == 0 && sum == 0)
				crc = ^uint32(0)
			}
			if j.csum() && crc32cBlock(j.seed, b, 16) != be.Uint32(b[16:]) {
				valid = false
			}
			if !valid {
				return done, revoked, nil // the log ends before this transaction
			}
			if revokeErr != nil {
				return nil, nil, revokeErr
			}
			for blk := range curRevokes {
				if old, ok := revoked[blk]; !ok || tidAfter(cur.seq, old) {
					revoked[blk] = cur.seq
				}
			}
			lastCommit = commitTime
			done = append(done, cur)
			cur = transaction{seq: cur.seq + 1}
			clear(curRevokes)
		default:
			return done, revoked, nil
		}
	}
}

func (j *journal) scratch() []byte {
	if j.data == nil {
		j.data = make([]byte, j.fs.sb.blockSize)
	}
	return j.data
}

func (j *journal) parseTag(b []byte) journalTag {
	be := binary.BigEndian
	var t journalTag
	t.fsBlock = uint64(be.Uint32(b))
	if j.incompat&jbd2IncompatCsumV3 != 0 {
		t.flags, t.csum = be.Uint32(b[4:]), be.Uint32(b[12:])
	} else {
		t.csum, t.flags = uint32(be.Uint16(b[4:])), uint32(be.Uint16(b[6:]))
	}
	if j.incompat&jbd2Incompat64bit != 0 {
		t.fsBlock |= uint64(be.Uint32(b[8:])) << 32
	}
	return t
}

// parseRevoke adds the blocks a revoke block names to blocks. Blocks
// outside the filesystem are left out: no tag can log them, and keeping
// them would let a hostile log fill memory.
func (j *journal) parseRevoke(b []byte, blocks map[uint64]bool) error {
	be := binary.BigEndian
	count := int(be.Uint32(b[12:]))
	if count > len(b)-j.tail {
		return corrupt("journal revoke block claims %d bytes", count)
	}
	size := 4
	if j.incompat&jbd2Incompat64bit != 0 {
		size = 8
	}
	for off := jbd2RevokeStart; off+size <= count; off += size {
		blk := uint64(be.Uint32(b[off:]))
		if size == 8 {
			blk = be.Uint64(b[off:])
		}
		if blk < j.fs.sb.blocksCount {
			blocks[blk] = true
		}
	}
	return nil
}

// tailValid checks a descriptor or revoke block's checksum tail.
func (j *journal) tailValid(b []byte) bool {
	n := len(b) - jbd2TailSize
	return crc32cBlock(j.seed, b, n) == binary.BigEndian.Uint32(b[n:])
}

// replayMap records, for every block the complete transactions log, the
// newest copy that no revoke record cancels.
func (j *journal) replayMap(txns []transaction, revoked map[uint64]uint32) error {
	fs := j.fs
	replay := map[uint64]journalCopy{}
	for _, t := range txns {
		for _, tag := range t.tags {
			if rs, ok := revoked[tag.fsBlock]; ok && !tidAfter(t.seq, rs) {
				continue
			}
			if tag.fsBlock >= fs.sb.blocksCount {
				return corrupt("journal transaction %d logs block %d, outside the filesystem", t.seq, tag.fsBlock)
			}
			pblk, err := j.read(tag.logBlock, j.scratch())
			if err != nil {
				return err
			}
			if j.csum() && !j.tagValid(tag, t.seq) {
				// e2fsck skips a logged block that fails its checksum
				// and replays the rest.
				continue
			}
			replay[tag.fsBlock] = journalCopy{block: pblk, escaped: tag.flags&jbd2FlagEscape != 0}
		}
	}
	fs.replay = replay
	return nil
}

// tagValid checks the logged block in j.data against its tag's checksum.
func (j *journal) tagValid(tag journalTag, seq uint32) bool {
	var s [4]byte
	binary.BigEndian.PutUint32(s[:], seq)
	sum := crc32cRaw(crc32cRaw(j.seed, s[:]), j.data)
	if j.incompat&jbd2IncompatCsumV3 != 0 {
		return sum == tag.csum
	}
	return uint16(sum) == uint16(tag.csum)
}

// tidAfter reports whether sequence a is after b, with wraparound.
func tidAfter(a, b uint32) bool { return int32(a-b) > 0 }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32cRaw continues a CRC32c without the usual pre- and
// post-inversion, as jbd2 computes it.
func crc32cRaw(crc uint32, p []byte) uint32 {
	return ^crc32.Update(^crc, castagnoli, p)
}

// crc32cBlock is crc32cRaw over b with the four bytes at off taken as
// zeros: where the block keeps its own checksum.
func crc32cBlock(crc uint32, b []byte, off int) uint32 {
	crc = crc32cRaw(crc, b[:off])
	crc = crc32cRaw(crc, []byte{0, 0, 0, 0})
	return crc32cRaw(crc, b[off+4:])
}

var crcBETable = func() (t [256]uint32) {
	for i := range t {
		c := uint32(i) << 24
		for range 8 {
			if c&0x80000000 != 0 {
				c = c<<1 ^ 0x04C11DB7
			} else {
				c <<= 1
			}
		}
		t[i] = c
	}
	return t
}()

// crc32BE is the kernel's crc32_be: the big-endian CRC32 that the old
// (v1) journal checksum feature uses.
func crc32BE(crc uint32, p []byte) uint32 {
	for _, c := range p {
		crc = crc<<8 ^ crcBETable[byte(crc>>24)^c]
	}
	return crc
}
