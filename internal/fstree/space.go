package fstree

// The data space (see Run.Virtual) is laid out as the first blocks of an
// ext4 image that kiln's writer makes: 4 KiB blocks, groups of 32768
// blocks, and with sparse_super a copy of the superblock and group
// descriptors at the start of groups 0, 1 and the powers of 3, 5 and 7.
// The space leaves the first superReserve blocks of those groups unused,
// so that the writer can make a file holding the data space the image
// without moving a byte of it, as long as the superblock and descriptors
// fit in the reserve (filesystems up to 504 GiB). A writer that needs
// more room there moves what is in the way.
const (
	GroupBlocks  = 32768
	SuperReserve = 64
)

// SuperCopyGroup reports whether ext4 group grp holds a copy of the
// superblock (sparse_super): groups 0 and 1 and the powers of 3, 5 and 7.
func SuperCopyGroup(grp int64) bool {
	if grp <= 1 {
		return true
	}
	for _, base := range []int64{3, 5, 7} {
		n := base
		for n < grp {
			n *= base
		}
		if n == grp {
			return true
		}
	}
	return false
}

// dataSpace hands out the data space in blocks, in ascending order,
// around the reserves.
type dataSpace struct{ end int64 } // in bytes, a multiple of blockSize

// take hands out length bytes: fn gets each piece, its place in the data
// space and its length (whole blocks but for the last piece), in order.
func (s *dataSpace) take(length int64, fn func(virtual, n int64) error) error {
	for length > 0 {
		b := s.end / blockSize
		if off := b % GroupBlocks; off < SuperReserve && SuperCopyGroup(b/GroupBlocks) {
			b += SuperReserve - off
		}
		// Up to the next reserve.
		grp := b/GroupBlocks + 1
		for !SuperCopyGroup(grp) {
			grp++
		}
		n := min(length, (grp*GroupBlocks-b)*blockSize)
		if err := fn(b*blockSize, n); err != nil {
			return err
		}
		s.end = b*blockSize + (n+blockSize-1)/blockSize*blockSize
		length -= n
	}
	return nil
}
