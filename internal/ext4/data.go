package ext4

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"sort"

	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/fstree"
)

// File contents do not pass through mke2fs: it would write them one 4 KiB
// block at a time. mke2fs lays out names and empty files; debugfs's
// fallocate then gives each file its blocks, kiln copies the contents from
// the tree's data files into those blocks in large kernel-side copies, and
// the metadata script marks the extents written (fallocate leaves them
// "uninitialized", which reads as zeros). e2fsprogs works on a file of its
// own meanwhile, holding the metadata only, which is copied into the image
// at the end.

// placement is where one file's blocks are in the image.
type placement struct {
	ino     uint32
	inode   *fstree.Inode
	node    *fstree.Node
	extents []extent
	// inInode says the extents are the inode's own four slots (a tree of
	// depth 0), which the metadata script can set directly.
	inInode bool
}

// allocateData adds to s the fallocate commands that give every file with
// content the blocks its data runs cover, holes left out.
func (b *builder) allocateData(s *script) {
	for _, n := range b.inodes {
		for _, r := range n.inode.Data() {
			first := r.Offset / BlockSize
			last := (r.Offset + r.Length - 1) / BlockSize
			s.printf("fallocate <%d> %d %d", n.ino, first, last)
		}
	}
}

// readBack reads every inode as mke2fs and the allocation left it, and
// where each file's blocks went, checking that they cover exactly the
// content's blocks.
func (b *builder) readBack() ([]placement, error) {
	im, err := OpenImage(b.meta)
	if err != nil {
		return nil, err
	}
	defer im.Close()
	sort.Slice(b.inodes, func(i, j int) bool { return b.inodes[i].ino < b.inodes[j].ino })
	var files []placement
	for i := range b.inodes {
		n := &b.inodes[i]
		if n.raw, err = im.inode(n.ino); err != nil {
			return nil, err
		}
		if n.inode.Type != fstree.TypeReg || len(n.inode.Data()) == 0 {
			continue
		}
		exts, err := im.extents(n.ino, n.raw)
		if err != nil {
			return nil, err
		}
		var got int64
		for _, e := range exts {
			got += e.length
		}
		if want := n.inode.Blocks(); got != want {
			return nil, fmt.Errorf("ext4: %q got %d blocks in the image, its content needs %d", "/"+n.node.Path(), got, want)
		}
		depth := binary.LittleEndian.Uint16(n.raw[0x28+6:])
		files = append(files, placement{ino: n.ino, inode: n.inode, node: n.node, extents: exts, inInode: depth == 0 && len(exts) <= len(inodeExtentFields)})
	}
	return files, nil
}

// inodeExtentFields names the i_block words that hold the length (and
// high bits of the start) of each of the four extents an inode holds
// itself: after the 12-byte header, 12 bytes each, length in the second
// word. debugfs names the words past the twelfth by their old roles.
var inodeExtentFields = [4]string{"block[4]", "block[7]", "block[10]", "block[DIND]"}

// markWritten adds to s the commands that turn the uninitialized extents
// fallocate made into ordinary ones, once the data is in place.
func markWritten(s *script, files []placement) {
	for _, p := range files {
		if p.inInode {
			for i, e := range p.extents {
				if e.uninit {
					s.printf("sif <%d> %s 0x%x", p.ino, inodeExtentFields[i], uint32(e.length)|uint32(e.physical>>32)<<16)
				}
			}
			continue
		}
		opened := false
		for _, e := range p.extents {
			if !e.uninit {
				continue
			}
			if !opened {
				s.printf("extent_open <%d>", p.ino)
				opened = true
			}
			s.printf("goto_block %d", e.logical)
			s.printf("replace_node %d %d %d", e.logical, e.length, e.physical)
		}
		if opened {
			s.printf("extent_close")
		}
	}
}

// copyData creates the image file and copies every file's content from
// the tree's data files into its blocks there.
func (b *builder) copyData(ctx context.Context, files []placement) error {
	dst, err := os.OpenFile(b.out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer dst.Close()
	if err := dst.Truncate(b.size); err != nil {
		return err
	}
	var srcs []*os.File
	defer func() {
		for _, f := range srcs {
			f.Close()
		}
	}()
	for i := range b.tree.DataFiles() {
		f, err := b.tree.OpenData(i)
		if err != nil {
			return err
		}
		srcs = append(srcs, f)
	}
	for _, p := range files {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := copyFile(dst, srcs, p); err != nil {
			return fmt.Errorf("ext4: writing the content of %q: %w", "/"+p.node.Path(), err)
		}
	}
	return dst.Close()
}

// assemble adds the metadata, all that e2fsprogs wrote, to the contents
// in the image file, and waits for the disk if sync is set.
func (b *builder) assemble(sync bool) error {
	meta, err := os.Open(b.meta)
	if err != nil {
		return err
	}
	defer meta.Close()
	dst, err := os.OpenFile(b.out, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer dst.Close()
	if err := clone.Regions(dst, meta); err != nil {
		return fmt.Errorf("ext4: adding the metadata: %w", err)
	}
	if sync {
		if err := dst.Sync(); err != nil {
			return err
		}
	}
	return dst.Close()
}

// copyFile copies one file's runs through its extents. Both are in file
// order, and the extents cover exactly the runs' blocks.
func copyFile(dst *os.File, srcs []*os.File, p placement) error {
	exts := p.extents
	for _, r := range p.inode.Data() {
		if r.File < 0 || r.File >= len(srcs) {
			return fmt.Errorf("no data file %d", r.File)
		}
		pos, end := r.Offset, r.Offset+r.Length
		for pos < end {
			for len(exts) > 0 && (exts[0].logical+exts[0].length)*BlockSize <= pos {
				exts = exts[1:]
			}
			if len(exts) == 0 || exts[0].logical*BlockSize > pos {
				return fmt.Errorf("no block for offset %d", pos)
			}
			e := exts[0]
			n := min(end, (e.logical+e.length)*BlockSize) - pos
			at := e.physical*BlockSize + pos - e.logical*BlockSize
			if err := clone.Range(dst, srcs[r.File], at, r.DataOffset+pos-r.Offset, n); err != nil {
				return err
			}
			pos += n
		}
	}
	return nil
}
