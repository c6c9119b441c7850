package overlayroot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
)

// Where the ext2/3/4 superblock and its fields are.
const (
	superblockOffset = 1024
	magicOffset      = 0x38
	labelOffset      = 0x78
	extMagic         = 0xef53
)

// ReadLabel reads the ext4 superblock from the start of a device and
// returns its volume label. ok is false if the device holds no ext2, ext3 or
// ext4 filesystem (they share the superblock, and ext4 mounts them all).
func ReadLabel(dev io.ReaderAt) (label string, ok bool, err error) {
	var sb [labelOffset + maxLabel]byte
	if _, err := dev.ReadAt(sb[:], superblockOffset); err != nil {
		if errors.Is(err, io.EOF) {
			return "", false, nil // too small to hold a filesystem
		}
		return "", false, err
	}
	if binary.LittleEndian.Uint16(sb[magicOffset:]) != extMagic {
		return "", false, nil
	}
	name := sb[labelOffset:]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name), true, nil
}
