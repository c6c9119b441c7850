package ext4read

import (
	"errors"
	"fmt"
	"io"
	"strings"
)

// File reads a regular file's content: an io.Reader, io.Seeker and
// io.ReaderAt over Size bytes. Holes, blocks past the last mapped one and
// uninitialised extents read as zeros. A File is not safe for concurrent
// use.
type File struct {
	fs   *FS
	ino  uint32
	size int64
	m    blockMapper
	off  int64
}

// Open opens the regular file ino for reading.
func (fs *FS) Open(ino uint32) (*File, error) {
	in, err := fs.Inode(ino)
	if err != nil {
		return nil, err
	}
	if in.Type != TypeRegular {
		return nil, inodeErr(ino, fmt.Errorf("opening a %s: not a regular file", in.Type))
	}
	if err := in.checkData(); err != nil {
		return nil, inodeErr(ino, err)
	}
	return &File{fs: fs, ino: ino, size: in.Size, m: fs.mapper(in)}, nil
}

// Size returns the file's size in bytes.
func (f *File) Size() int64 { return f.size }

// ReadAt implements io.ReaderAt.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, inodeErr(f.ino, errors.New("negative read offset"))
	}
	if off >= f.size {
		return 0, io.EOF
	}
	want := int(min(int64(len(p)), f.size-off))
	bs := f.fs.sb.blockSize
	for n := 0; n < want; {
		pos := off + int64(n)
		r, err := f.m.runAt(uint64(pos / bs))
		if err != nil {
			return n, inodeErr(f.ino, err)
		}
		in := pos % bs
		chunk := int(min(int64(r.n)*bs-in, int64(want-n)))
		if r.zero {
			clear(p[n : n+chunk])
		} else if err := f.fs.readBlocks(r.pblk, in, p[n:n+chunk]); err != nil {
			return n, inodeErr(f.ino, err)
		}
		n += chunk
	}
	if want < len(p) {
		return want, io.EOF
	}
	return want, nil
}

// Read implements io.Reader.
func (f *File) Read(p []byte) (int, error) {
	n, err := f.ReadAt(p, f.off)
	f.off += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// Seek implements io.Seeker.
func (f *File) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += f.off
	case io.SeekEnd:
		offset += f.size
	default:
		return f.off, errors.New("seek: invalid whence")
	}
	if offset < 0 {
		return f.off, errors.New("seek: negative position")
	}
	f.off = offset
	return offset, nil
}

// SameBlocks reports whether f and g have the same size and map every
// block of it alike: to the same physical blocks (that neither journal
// replaces), or both to zeros. Between an image and a block copy of it,
// that means the same content unless blocks were rewritten in place.
func (f *File) SameBlocks(g *File) (bool, error) {
	if f.size != g.size {
		return false, nil
	}
	bs := uint64(f.fs.sb.blockSize)
	if bs != uint64(g.fs.sb.blockSize) {
		return false, nil
	}
	end := (uint64(f.size) + bs - 1) / bs
	for lblk := uint64(0); lblk < end; {
		a, err := f.m.runAt(lblk)
		if err != nil {
			return false, inodeErr(f.ino, err)
		}
		b, err := g.m.runAt(lblk)
		if err != nil {
			return false, inodeErr(g.ino, err)
		}
		n := min(a.n, b.n)
		if a.zero != b.zero || (!a.zero && (a.pblk != b.pblk || f.fs.replays(a.pblk, n) || g.fs.replays(b.pblk, n))) {
			return false, nil
		}
		lblk += n
	}
	return true, nil
}

// replays reports whether the journal replaces any of n blocks from blk.
func (fs *FS) replays(blk, n uint64) bool {
	if len(fs.replay) == 0 {
		return false
	}
	for i := range n {
		if _, ok := fs.replay[blk+i]; ok {
			return true
		}
	}
	return false
}

// Symlink targets are at most PATH_MAX-1 bytes, and a slow symlink's
// target fits its one block.
const maxSymlink = 4095

// Readlink returns the target of symlink ino.
func (fs *FS) Readlink(ino uint32) (string, error) {
	in, err := fs.Inode(ino)
	if err != nil {
		return "", err
	}
	target, err := fs.readlink(in)
	if err != nil {
		return "", inodeErr(ino, err)
	}
	return target, nil
}

func (fs *FS) readlink(in *Inode) (string, error) {
	if in.Type != TypeSymlink {
		return "", fmt.Errorf("reading the target of a %s: not a symlink", in.Type)
	}
	if err := in.checkData(); err != nil {
		return "", err
	}
	if in.Size == 0 {
		return "", corrupt("symlink has an empty target")
	}
	var target []byte
	// Like the kernel, a symlink whose only blocks are its xattr block
	// keeps its target in i_block (a fast symlink).
	var eaBlocks uint64
	if in.fileACL != 0 {
		eaBlocks = uint64(fs.sb.blockSize / 512)
	}
	if in.blocks512 == eaBlocks {
		if in.Size >= int64(len(in.block)) {
			return "", corrupt("fast symlink target of %d bytes does not fit the inode", in.Size)
		}
		target = in.block[:in.Size]
	} else {
		if in.Size > maxSymlink || in.Size >= fs.sb.blockSize {
			return "", corrupt("symlink target of %d bytes is too long", in.Size)
		}
		r, err := fs.mapper(in).runAt(0)
		if err != nil {
			return "", err
		}
		if r.zero {
			return "", corrupt("symlink target block is a hole")
		}
		target = make([]byte, in.Size)
		if err := fs.readBlocks(r.pblk, 0, target); err != nil {
			return "", err
		}
	}
	if strings.IndexByte(string(target), 0) >= 0 {
		return "", corrupt("symlink target contains a NUL byte")
	}
	return string(target), nil
}
