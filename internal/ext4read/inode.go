package ext4read

import (
	"encoding/binary"
	"time"
)

// Type is the kind of file an inode or directory entry is.
type Type uint8

// File types.
const (
	TypeUnknown Type = iota // a directory entry without the filetype feature
	TypeRegular
	TypeDir
	TypeSymlink
	TypeFifo
	TypeCharDev
	TypeBlockDev
	TypeSocket
)

func (t Type) String() string {
	switch t {
	case TypeRegular:
		return "regular file"
	case TypeDir:
		return "directory"
	case TypeSymlink:
		return "symlink"
	case TypeFifo:
		return "fifo"
	case TypeCharDev:
		return "character device"
	case TypeBlockDev:
		return "block device"
	case TypeSocket:
		return "socket"
	}
	return "unknown"
}

// Inode is the metadata of one file.
type Inode struct {
	Ino  uint32
	Type Type
	// Mode holds the permission bits with setuid, setgid and sticky
	// (07777).
	Mode     uint32
	UID, GID uint32
	Size     int64
	Links    uint32
	// Times carry nanoseconds and the epoch bits of the extra fields
	// when the inode has them.
	Atime, Mtime, Ctime time.Time
	// Major and Minor are the device numbers of character and block
	// devices.
	Major, Minor uint32
	Flags        uint32 // ext4 inode flags (EXT4_*_FL)

	block     [60]byte // i_block: extent root, block map or fast symlink
	fileACL   uint64   // xattr block
	blocks512 uint64   // i_blocks in 512-byte units
	ibody     []byte   // in-inode xattr area, nil if none
}

// Inode flags the reader acts on.
const (
	flagEncrypt    = 0x800
	flagHugeFile   = 0x40000
	flagExtents    = 0x80000
	flagEAInode    = 0x200000
	flagInlineData = 0x10000000
)

// ext4's largest logical block number is 2^32-1.
const maxLogicalBlocks = 1 << 32

// Inode reads inode ino.
func (fs *FS) Inode(ino uint32) (*Inode, error) {
	b, err := fs.rawInode(ino)
	if err != nil {
		return nil, inodeErr(ino, err)
	}
	in, err := fs.parseInode(ino, b)
	if err != nil {
		return nil, inodeErr(ino, err)
	}
	return in, nil
}

func (fs *FS) parseInode(ino uint32, b []byte) (*Inode, error) {
	le := binary.LittleEndian
	mode := uint32(le.Uint16(b[0x0:]))
	in := &Inode{
		Ino:   ino,
		Mode:  mode & 0o7777,
		UID:   uint32(le.Uint16(b[0x2:])) | uint32(le.Uint16(b[0x78:]))<<16,
		GID:   uint32(le.Uint16(b[0x18:])) | uint32(le.Uint16(b[0x7A:]))<<16,
		Links: uint32(le.Uint16(b[0x1A:])),
		Flags: le.Uint32(b[0x20:]),
	}
	switch mode & 0xF000 {
	case 0x1000:
		in.Type = TypeFifo
	case 0x2000:
		in.Type = TypeCharDev
	case 0x4000:
		in.Type = TypeDir
	case 0x6000:
		in.Type = TypeBlockDev
	case 0x8000:
		in.Type = TypeRegular
	case 0xA000:
		in.Type = TypeSymlink
	case 0xC000:
		in.Type = TypeSocket
	default:
		return nil, corrupt("mode 0%o has no valid file type (is the inode in use?)", mode)
	}
	copy(in.block[:], b[0x28:0x28+60])

	size := uint64(le.Uint32(b[0x4:]))
	if in.Type == TypeRegular || fs.sb.incompat&incompatLargeDir != 0 {
		size |= uint64(le.Uint32(b[0x6C:])) << 32
	}
	if size > maxLogicalBlocks*uint64(fs.sb.blockSize) {
		return nil, corrupt("size %d is larger than ext4 allows", size)
	}
	in.Size = int64(size)

	in.fileACL = uint64(le.Uint32(b[0x68:]))
	if fs.sb.has64bit() {
		in.fileACL |= uint64(le.Uint16(b[0x76:])) << 32
	}
	in.blocks512 = uint64(le.Uint32(b[0x1C:]))
	if fs.sb.roCompat&roCompatHugeFile != 0 {
		in.blocks512 |= uint64(le.Uint16(b[0x74:])) << 32
		if in.Flags&flagHugeFile != 0 {
			in.blocks512 *= uint64(fs.sb.blockSize / 512)
		}
	}

	// The extra fields: their size, then the in-inode xattr area.
	extra := 0
	if len(b) > 128 {
		extra = int(le.Uint16(b[0x80:]))
		if 128+extra > len(b) || extra%4 != 0 {
			return nil, corrupt("extra inode size %d is invalid", extra)
		}
		if extra > 0 && 128+extra+4 <= len(b) {
			in.ibody = b[128+extra:]
		}
	}
	for _, t := range []struct {
		dst       *time.Time
		lo, extra int
	}{{&in.Ctime, 0xC, 0x84}, {&in.Mtime, 0x10, 0x88}, {&in.Atime, 0x8, 0x8C}} {
		var ex uint32
		has := t.extra+4 <= 128+extra
		if has {
			ex = le.Uint32(b[t.extra:])
		}
		*t.dst = inodeTime(le.Uint32(b[t.lo:]), ex, has)
	}

	if in.Type == TypeCharDev || in.Type == TypeBlockDev {
		// Old 8:8 numbers in i_block[0]; else the 12:20 encoding in
		// i_block[1].
		if old := le.Uint32(in.block[0:]); old != 0 {
			in.Major, in.Minor = (old>>8)&0xff, old&0xff
		} else {
			dev := le.Uint32(in.block[4:])
			in.Major, in.Minor = (dev&0xfff00)>>8, (dev&0xff)|((dev>>12)&0xfff00)
		}
	}
	return in, nil
}

// inodeTime decodes a 32-bit seconds field and its extra field: two
// epoch bits extending the signed seconds, then nanoseconds.
func inodeTime(lo uint32, extra uint32, hasExtra bool) time.Time {
	sec := int64(int32(lo))
	var nsec int64
	if hasExtra {
		sec += int64(extra&3) << 32
		nsec = int64(extra >> 2)
	}
	return time.Unix(sec, nsec).UTC()
}

// checkData refuses inodes whose data the reader cannot interpret.
func (in *Inode) checkData() error {
	switch {
	case in.Flags&flagInlineData != 0:
		return unsupported("inline data")
	case in.Flags&flagEncrypt != 0:
		return unsupported("encryption")
	}
	return nil
}
