package ext4write

import (
	"encoding/binary"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the kernel's ext4_chksum: CRC-32C continued from seed, with
// neither the usual initial nor final inversion (Go's Update applies both,
// so they are undone around it).
func crc32c(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, castagnoli, p)
}

func crc32cU32(seed, v uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return crc32c(seed, b[:])
}

var zeros [4096]byte

// inodeSeed is the per-inode checksum seed that covers an inode's own
// blocks (extent tree, directories): the inode number and generation
// folded into the filesystem's seed.
func inodeSeed(fsSeed, ino, generation uint32) uint32 {
	return crc32cU32(crc32cU32(fsSeed, ino), generation)
}
