package ext4write

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// xattr is one extended attribute as ext4 stores it: the name's prefix
// as an index, the rest of the name, the value.
type xattr struct {
	index uint8
	name  []byte
	value []byte
}

// xattrPrefixes maps name prefixes to ext4's name indexes, longest first.
var xattrPrefixes = []struct {
	prefix string
	index  uint8
}{
	{"system.posix_acl_default", 3},
	{"system.posix_acl_access", 2},
	{"system.richacl", 8},
	{"security.", 6},
	{"trusted.", 4},
	{"system.", 7},
	{"user.", 1},
}

const (
	xattrMagic     = 0xEA020000
	xattrEntrySize = 16 // before the name
	xattrBlockHead = 32
	// inodeXattrStart is where the in-inode attributes begin: after the
	// 128-byte base inode and its extra fields.
	inodeXattrStart = 128 + extraIsize
)

// errXattrSpace is wrapped when a file's extended attributes do not fit
// in its inode and one block, all the room ext4 gives them without the
// ea_inode feature.
var errXattrSpace = errors.New("extended attributes do not fit")

// encodeXattrs turns a file's attributes into ext4's form, sorted the way
// the kernel keeps an attribute block (by index, name length, name).
func encodeXattrs(attrs map[string]string) ([]xattr, error) {
	out := make([]xattr, 0, len(attrs))
	for k, v := range attrs {
		x := xattr{name: []byte(k), value: []byte(v)}
		for _, p := range xattrPrefixes {
			if strings.HasPrefix(k, p.prefix) {
				x.index, x.name = p.index, []byte(k[len(p.prefix):])
				break
			}
		}
		if len(x.name) > 255 {
			return nil, fmt.Errorf("xattr %q: name too long", k)
		}
		if x.index == 2 || x.index == 3 {
			var err error
			if x.value, err = diskACL(x.value); err != nil {
				return nil, fmt.Errorf("xattr %q: %w", k, err)
			}
		}
		out = append(out, x)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.index != b.index {
			return a.index < b.index
		}
		if len(a.name) != len(b.name) {
			return len(a.name) < len(b.name)
		}
		return bytes.Compare(a.name, b.name) < 0
	})
	return out, nil
}

func pad4(n int) int { return (n + 3) &^ 3 }

func (x xattr) entrySize() int { return xattrEntrySize + pad4(len(x.name)) }

// splitXattrs decides which attributes live in the inode's spare room
// and which in an attribute block: as many as fit in the inode, in
// order, the rest in the block.
func splitXattrs(xs []xattr) (inInode, inBlock []xattr, err error) {
	room := inodeSize - inodeXattrStart - 4 - 4 // magic, end marker
	k := 0
	for ; k < len(xs); k++ {
		need := xs[k].entrySize() + pad4(len(xs[k].value))
		if need > room {
			break
		}
		room -= need
	}
	inInode, inBlock = xs[:k], xs[k:]
	need := xattrBlockHead + 4
	for _, x := range inBlock {
		need += x.entrySize() + pad4(len(x.value))
	}
	if len(inBlock) > 0 && need > blockSize {
		return nil, nil, fmt.Errorf("%w: they need %d bytes, more than one %d-byte block", errXattrSpace, need, blockSize)
	}
	return inInode, inBlock, nil
}

// putXattrs writes entries at the start of area and their values at its
// end; value offsets count from base. It returns the entries' hashes.
func putXattrs(area []byte, base int, xs []xattr) {
	le := binary.LittleEndian
	pos, end := 0, len(area)
	for _, x := range xs {
		end -= pad4(len(x.value))
		copy(area[end:], x.value)
		e := area[pos:]
		e[0] = uint8(len(x.name))
		e[1] = x.index
		le.PutUint16(e[2:], uint16(end+base))
		le.PutUint32(e[8:], uint32(len(x.value)))
		copy(e[xattrEntrySize:], x.name)
		le.PutUint32(e[12:], xattrHash(x))
		pos += x.entrySize()
	}
}

// xattrHash is ext4_xattr_hash_entry.
func xattrHash(x xattr) uint32 {
	var h uint32
	for _, c := range x.name {
		h = h<<5 ^ h>>27 ^ uint32(c)
	}
	v := make([]byte, pad4(len(x.value)))
	copy(v, x.value)
	for i := 0; i < len(v); i += 4 {
		h = h<<16 ^ h>>16 ^ binary.LittleEndian.Uint32(v[i:])
	}
	return h
}

// inodeXattrs fills an inode's spare room with attributes.
func inodeXattrs(raw []byte, xs []xattr) {
	if len(xs) == 0 {
		return
	}
	binary.LittleEndian.PutUint32(raw[inodeXattrStart:], xattrMagic)
	// Value offsets count from the first entry.
	putXattrs(raw[inodeXattrStart+4:], 0, xs)
}

// xattrBlock builds an attribute block at block number blk.
func xattrBlock(xs []xattr, blk int64, fsSeed uint32) []byte {
	le := binary.LittleEndian
	b := make([]byte, blockSize)
	le.PutUint32(b[0:], xattrMagic)
	le.PutUint32(b[4:], 1) // refcount
	le.PutUint32(b[8:], 1) // blocks
	putXattrs(b[xattrBlockHead:], xattrBlockHead, xs)
	var h uint32
	for _, x := range xs {
		h = h<<16 ^ h>>16 ^ xattrHash(x)
	}
	le.PutUint32(b[12:], h)
	var nr [8]byte
	le.PutUint64(nr[:], uint64(blk))
	le.PutUint32(b[16:], crc32c(crc32c(fsSeed, nr[:]), b))
	return b
}

// diskACL converts a POSIX ACL from the form the kernel's xattr calls and
// tar use (version 2, 8-byte entries) to ext4's on-disk form (version 1,
// 4-byte entries for the owner, group, mask and other entries).
func diskACL(v []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || le.Uint32(v) != 2 || (len(v)-4)%8 != 0 {
		return nil, fmt.Errorf("not a POSIX ACL (version 2)")
	}
	out := make([]byte, 4, len(v))
	le.PutUint32(out, 1)
	for p := v[4:]; len(p) > 0; p = p[8:] {
		tag := le.Uint16(p)
		switch tag {
		case 0x01, 0x04, 0x10, 0x20: // user_obj, group_obj, mask, other
			out = append(out, p[:4]...)
		case 0x02, 0x08: // user, group
			out = append(out, p[:8]...)
		default:
			return nil, fmt.Errorf("unknown ACL tag %#x", tag)
		}
	}
	return out, nil
}
