package ext4read

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

// Extended attribute constants.
const (
	xattrMagic       = 0xEA020000
	xattrBlockHeader = 32
	maxXattrValue    = 65536 // XATTR_SIZE_MAX: the largest value Linux accepts
	maxXattrTotal    = 1 << 20
)

// Name prefixes by name index. Indexes the kernel does not expose (Lustre,
// richacl, the encryption context) are left out, as listxattr does.
var xattrPrefixes = map[uint8]string{
	1:  "user.",
	2:  "system.posix_acl_access",
	3:  "system.posix_acl_default",
	4:  "trusted.",
	6:  "security.",
	7:  "system.",
	10: "gnu.",
}

// Xattrs returns the extended attributes of inode ino, from the inode
// itself and from its xattr block, by full name ("user.x",
// "security.capability"). POSIX ACLs are returned in the form getxattr
// gives, not ext4's compact on-disk form.
func (fs *FS) Xattrs(ino uint32) (map[string][]byte, error) {
	in, err := fs.Inode(ino)
	if err != nil {
		return nil, err
	}
	x, err := fs.xattrs(in)
	if err != nil {
		return nil, inodeErr(ino, err)
	}
	return x, nil
}

func (fs *FS) xattrs(in *Inode) (map[string][]byte, error) {
	out := map[string][]byte{}
	total := 0 // bytes of values, bounded: values in their own inodes can be many
	le := binary.LittleEndian
	if len(in.ibody) >= 4 && le.Uint32(in.ibody) == xattrMagic {
		// In-inode values are placed relative to the first entry.
		if err := fs.parseXattrs(in.ibody[4:], 0, out, &total); err != nil {
			return nil, fmt.Errorf("in-inode xattrs: %w", err)
		}
	}
	if in.fileACL != 0 {
		blk := in.fileACL
		if blk < fs.sb.firstDataBlock || blk >= fs.sb.blocksCount {
			return nil, corrupt("xattr block %d is outside the filesystem", blk)
		}
		b := make([]byte, fs.sb.blockSize)
		if err := fs.readBlock(blk, b); err != nil {
			return nil, fmt.Errorf("xattr block: %w", err)
		}
		if le.Uint32(b) != xattrMagic {
			return nil, corrupt("xattr block %d has a bad magic number", blk)
		}
		if n := le.Uint32(b[8:]); n != 1 {
			return nil, corrupt("xattr block %d claims %d blocks", blk, n)
		}
		if err := fs.parseXattrs(b, xattrBlockHeader, out, &total); err != nil {
			return nil, fmt.Errorf("xattr block %d: %w", blk, err)
		}
	}
	return out, nil
}

// parseXattrs adds the entries that start at offset first of area, whose
// values are placed relative to area's start, counting value bytes in
// total.
func (fs *FS) parseXattrs(area []byte, first int, out map[string][]byte, total *int) error {
	le := binary.LittleEndian
	type entry struct {
		name            string
		valOff, valSize int
		valInum         uint32
	}
	var ents []entry
	off := first
	for {
		if len(area)-off < 4 {
			return corrupt("entries run past their area")
		}
		if le.Uint32(area[off:]) == 0 {
			break
		}
		if len(area)-off < 16 {
			return corrupt("entry at %d runs past its area", off)
		}
		nameLen, index := int(area[off]), area[off+1]
		size := (16 + nameLen + 3) &^ 3
		if len(area)-off < size {
			return corrupt("entry at %d runs past its area", off)
		}
		name := string(area[off+16 : off+16+nameLen])
		e := entry{
			valOff:  int(le.Uint16(area[off+2:])),
			valInum: le.Uint32(area[off+4:]),
			valSize: int(le.Uint32(area[off+8:])),
		}
		off += size
		prefix, ok := xattrPrefixes[index]
		if !ok {
			continue
		}
		if strings.IndexByte(name, 0) >= 0 {
			return corrupt("xattr name %q contains a NUL byte", name)
		}
		e.name = prefix + name
		ents = append(ents, e)
	}
	valuesStart := off + 4 // values may not overlap the entries
	for _, e := range ents {
		if _, dup := out[e.name]; dup {
			return corrupt("xattr %q appears twice", e.name)
		}
		var v []byte
		if e.valInum != 0 {
			var err error
			if v, err = fs.eaInodeValue(e.valInum, e.valSize); err != nil {
				return fmt.Errorf("xattr %q: %w", e.name, err)
			}
		} else if e.valSize > 0 {
			if e.valSize > len(area) {
				return corrupt("xattr %q value of %d bytes does not fit", e.name, e.valSize)
			}
			if e.valOff < valuesStart || e.valOff > len(area)-e.valSize {
				return corrupt("xattr %q value at %d+%d is outside its area", e.name, e.valOff, e.valSize)
			}
			v = append([]byte{}, area[e.valOff:e.valOff+e.valSize]...)
		} else {
			v = []byte{}
		}
		if *total += len(v); *total > maxXattrTotal {
			return overLimit("xattr values add up to more than %d bytes", maxXattrTotal)
		}
		if strings.HasPrefix(e.name, "system.posix_acl_") {
			var err error
			if v, err = aclToXattr(v); err != nil {
				return fmt.Errorf("xattr %q: %w", e.name, err)
			}
		}
		out[e.name] = v
	}
	return nil
}

// eaInodeValue reads a value stored in its own inode (ea_inode feature).
func (fs *FS) eaInodeValue(ino uint32, size int) ([]byte, error) {
	if fs.sb.incompat&incompatEAInode == 0 {
		return nil, corrupt("value in inode %d without the ea_inode feature", ino)
	}
	if size < 0 || size > maxXattrValue {
		return nil, corrupt("value of %d bytes is larger than Linux allows", size)
	}
	in, err := fs.Inode(ino)
	if err != nil {
		return nil, err
	}
	if in.Type != TypeRegular || in.Flags&flagEAInode == 0 || in.Size != int64(size) {
		return nil, corrupt("inode %d is not a %d-byte xattr value inode", ino, size)
	}
	if err := in.checkData(); err != nil {
		return nil, inodeErr(ino, err)
	}
	f := &File{fs: fs, ino: ino, size: in.Size, m: fs.mapper(in)}
	v := make([]byte, size)
	if _, err := io.ReadFull(f, v); err != nil {
		return nil, err
	}
	return v, nil
}

// POSIX ACL tags and versions: ext4 stores ACLs compactly (version 1,
// 4-byte entries for the owner, group, mask and other classes), getxattr
// returns them with 8-byte entries (version 2).
const (
	aclUserObj      = 0x01
	aclUser         = 0x02
	aclGroupObj     = 0x04
	aclGroup        = 0x08
	aclMask         = 0x10
	aclOther        = 0x20
	aclDiskVersion  = 1
	aclXattrVersion = 2
	aclUndefinedID  = 0xFFFFFFFF
)

func aclToXattr(disk []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(disk) < 4 || le.Uint32(disk) != aclDiskVersion {
		return nil, corrupt("POSIX ACL has a bad header")
	}
	out := le.AppendUint32(make([]byte, 0, 2*len(disk)), aclXattrVersion)
	for p := disk[4:]; len(p) > 0; {
		if len(p) < 4 {
			return nil, corrupt("POSIX ACL entry is truncated")
		}
		tag, perm := le.Uint16(p), le.Uint16(p[2:])
		id := uint32(aclUndefinedID)
		switch tag {
		case aclUserObj, aclGroupObj, aclMask, aclOther:
			p = p[4:]
		case aclUser, aclGroup:
			if len(p) < 8 {
				return nil, corrupt("POSIX ACL entry is truncated")
			}
			id = le.Uint32(p[4:])
			p = p[8:]
		default:
			return nil, corrupt("POSIX ACL entry has unknown tag 0x%x", tag)
		}
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		out = le.AppendUint32(out, id)
	}
	return out, nil
}
