package ext4read

import (
	"encoding/binary"
	"errors"
	"fmt"
	iofs "io/fs"
	"sort"
	"strings"
)

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
	// Type is what the entry says (TypeUnknown without the filetype
	// feature); the inode's own type is authoritative.
	Type Type
}

// ReadDir returns the entries of directory ino, sorted by name, without
// "." and "..". Hashed (htree) directories are read linearly: their index
// blocks look like empty entries.
func (fs *FS) ReadDir(ino uint32) ([]DirEntry, error) {
	in, err := fs.Inode(ino)
	if err != nil {
		return nil, err
	}
	ents, err := fs.readDir(in)
	if err != nil {
		return nil, inodeErr(ino, err)
	}
	return ents, nil
}

func (fs *FS) readDir(in *Inode) ([]DirEntry, error) {
	if in.Type != TypeDir {
		return nil, fmt.Errorf("reading a %s as a directory: not a directory", in.Type)
	}
	if err := in.checkData(); err != nil {
		return nil, err
	}
	bs := fs.sb.blockSize
	if in.Size%bs != 0 {
		return nil, corrupt("directory size %d is not a multiple of the block size", in.Size)
	}
	if uint64(in.Size/bs) > fs.sb.blocksCount {
		return nil, corrupt("directory of %d bytes is larger than the filesystem", in.Size)
	}
	nblocks := uint64(in.Size / bs)
	m := fs.mapper(in)
	b := make([]byte, bs)
	var ents []DirEntry
	for lblk := uint64(0); lblk < nblocks; {
		r, err := m.runAt(lblk)
		if err != nil {
			return nil, err
		}
		if r.zero {
			return nil, corrupt("directory block %d is a hole", lblk)
		}
		for i := uint64(0); i < r.n && lblk < nblocks; i, lblk = i+1, lblk+1 {
			if err := fs.readBlock(r.pblk+i, b); err != nil {
				return nil, err
			}
			if ents, err = fs.parseDirBlock(b, lblk == 0, ents); err != nil {
				return nil, fmt.Errorf("directory block %d: %w", lblk, err)
			}
		}
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	for i := 1; i < len(ents); i++ {
		if ents[i].Name == ents[i-1].Name {
			return nil, corrupt("directory has two entries named %q", ents[i].Name)
		}
	}
	return ents, nil
}

// parseDirBlock appends the entries of one directory block to ents. The
// checks are the kernel's: record lengths that are aligned, hold their
// name and stay in the block. The checksum tail (inode 0) reads as an
// empty entry.
func (fs *FS) parseDirBlock(b []byte, first bool, ents []DirEntry) ([]DirEntry, error) {
	le := binary.LittleEndian
	bs := len(b)
	for off, nth := 0, 0; off < bs; nth++ {
		if bs-off < 12 {
			return nil, corrupt("entry at offset %d runs past the block", off)
		}
		ino := le.Uint32(b[off:])
		recLen := int(le.Uint16(b[off+4:]))
		if bs >= 65536 { // 64 KiB blocks store the length in 16 bits
			if recLen == 65535 || recLen == 0 {
				recLen = 65536
			} else {
				recLen = recLen&65532 | (recLen&3)<<16
			}
		}
		nameLen := int(b[off+6])
		switch {
		case recLen < 12 || recLen%4 != 0:
			return nil, corrupt("entry at offset %d has record length %d", off, recLen)
		case recLen > bs-off:
			return nil, corrupt("entry at offset %d runs past the block", off)
		case 8+nameLen > recLen:
			return nil, corrupt("entry at offset %d has a name longer than its record", off)
		}
		name := string(b[off+8 : off+8+nameLen])
		off += recLen
		if ino == 0 {
			continue
		}
		if first && (nth == 0 && name == "." || nth == 1 && name == "..") {
			continue
		}
		if len(ents) >= fs.opts.MaxEntries {
			return nil, overLimit("directory has more than %d entries", fs.opts.MaxEntries)
		}
		if err := checkName(name); err != nil {
			return nil, err
		}
		if ino > fs.sb.inodesCount || (ino < fs.sb.firstIno && ino != RootIno) {
			return nil, corrupt("entry %q points to inode %d, which is reserved or out of range", name, ino)
		}
		t := TypeUnknown
		if fs.sb.incompat&incompatFiletype != 0 && b[off-recLen+7] <= 7 {
			t = direntTypes[b[off-recLen+7]]
		}
		ents = append(ents, DirEntry{Name: name, Ino: ino, Type: t})
	}
	return ents, nil
}

var direntTypes = [8]Type{TypeUnknown, TypeRegular, TypeDir, TypeCharDev, TypeBlockDev, TypeFifo, TypeSocket, TypeSymlink}

func checkName(name string) error {
	switch {
	case name == "":
		return corrupt("entry with an empty name")
	case name == "." || name == "..":
		return corrupt("entry named %q in the wrong place", name)
	case strings.ContainsAny(name, "/\x00"):
		return corrupt("entry name %q contains '/' or NUL", name)
	}
	return nil
}

// Lookup returns the inode at path, a slash-separated path from the root
// ("/" or "" is the root). Symlinks are not followed, "." is ignored and
// ".." is refused. A missing name gives an error wrapping fs.ErrNotExist.
func (fs *FS) Lookup(path string) (uint32, error) {
	ino := uint32(RootIno)
	for _, name := range strings.Split(path, "/") {
		if name == "" || name == "." {
			continue
		}
		if name == ".." {
			return 0, fmt.Errorf("looking up %q: \"..\" is not allowed", path)
		}
		ents, err := fs.ReadDir(ino)
		if err != nil {
			return 0, fmt.Errorf("looking up %q: %w", path, err)
		}
		i := sort.Search(len(ents), func(i int) bool { return ents[i].Name >= name })
		if i == len(ents) || ents[i].Name != name {
			return 0, fmt.Errorf("looking up %q: %w", path, iofs.ErrNotExist)
		}
		ino = ents[i].Ino
	}
	return ino, nil
}

// Walker reads directories for a walk of the tree, enforcing what makes
// a walk finite on a hostile image: each directory is read at most once
// (a directory reached twice is a hard-linked directory or a cycle), the
// depth and the number of entries are bounded by Options, and the
// directories read together are no larger than the filesystem (a hostile
// image can point many directories at the same blocks).
type Walker struct {
	fs      *FS
	seen    map[uint32]bool
	entries int
	bytes   uint64
}

// NewWalker starts a walk; limits count over all the Walker's reads.
func (fs *FS) NewWalker() *Walker {
	return &Walker{fs: fs, seen: map[uint32]bool{}}
}

// ReadDir returns directory in's entries like FS.ReadDir. depth is how
// many directories deep in is below the walk's root (0 for the root).
func (w *Walker) ReadDir(in *Inode, depth int) ([]DirEntry, error) {
	fs := w.fs
	if in.Type != TypeDir {
		return nil, inodeErr(in.Ino, fmt.Errorf("reading a %s as a directory: not a directory", in.Type))
	}
	if w.seen[in.Ino] {
		return nil, inodeErr(in.Ino, corrupt("directory is reached twice (a directory hard link or a cycle)"))
	}
	if depth > fs.opts.MaxDepth {
		return nil, inodeErr(in.Ino, overLimit("directory is more than %d levels deep", fs.opts.MaxDepth))
	}
	w.bytes += uint64(in.Size)
	if w.bytes > fs.sb.blocksCount*uint64(fs.sb.blockSize) {
		return nil, inodeErr(in.Ino, corrupt("directories are larger than the filesystem"))
	}
	w.seen[in.Ino] = true
	ents, err := fs.readDir(in)
	if err != nil {
		return nil, inodeErr(in.Ino, err)
	}
	w.entries += len(ents)
	if w.entries > fs.opts.MaxEntries {
		return nil, overLimit("the tree has more than %d entries", fs.opts.MaxEntries)
	}
	return ents, nil
}

// Walk calls fn for root and every file below it, depth first, names in
// sorted (byte) order. Paths are relative to root: "." for root itself,
// then "a", "a/b". Returning fs.SkipDir from fn for a directory skips its
// contents; for another file, the rest of its directory. fs.SkipAll stops
// the walk. Errors about a file name its path.
func (fs *FS) Walk(root uint32, fn func(path string, in *Inode) error) error {
	in, err := fs.Inode(root)
	if err != nil {
		return err
	}
	err = fn(".", in)
	if err == nil && in.Type == TypeDir {
		err = fs.walkDir(fs.NewWalker(), ".", in, 0, fn)
	}
	if errors.Is(err, iofs.SkipDir) || errors.Is(err, iofs.SkipAll) {
		return nil
	}
	return err
}

func (fs *FS) walkDir(w *Walker, dir string, in *Inode, depth int, fn func(string, *Inode) error) error {
	ents, err := w.ReadDir(in, depth)
	if err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	for _, e := range ents {
		p := e.Name
		if dir != "." {
			p = dir + "/" + e.Name
		}
		child, err := fs.Inode(e.Ino)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		err = fn(p, child)
		if err == nil && child.Type == TypeDir {
			err = fs.walkDir(w, p, child, depth+1, fn)
		}
		if errors.Is(err, iofs.SkipDir) {
			if child.Type == TypeDir {
				continue
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}
