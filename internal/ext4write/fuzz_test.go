package ext4write

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/fstree/fstreetest"
)

// FuzzWrite writes trees made of layers drawn from the input (see
// fstreetest): e2fsck must find the image clean, and ext4read must read
// back the tree, entry by entry: type, mode, owner, times, size,
// content, symlink target, device numbers, xattrs and hard links. A
// layer that fails to apply leaves the tree as far as it got, which is
// written all the same. The bits of opts say which layers are stored
// (ApplyStored, bits 0-3), whether the image takes the tree's data file
// (bit 4), and the size (bits 5-6: automatic, or 4, 8 or 32 MiB, which
// may be too small).
func FuzzWrite(f *testing.F) {
	ext4test.Require(f)
	for i, seed := range fstreetest.Seeds() {
		for _, opts := range []uint8{0, 0b1111, 0b10000, 0b0100101, 0b1100000} {
			f.Add(seed, opts^uint8(i))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, opts uint8) {
		work := t.TempDir()
		tree, err := fstree.New("", filepath.Join(work, "data"), time.Unix(0, 0))
		if err != nil {
			t.Fatal(err)
		}
		for i, l := range fstreetest.Layers(data) {
			stored := ""
			if opts>>i&1 == 1 {
				stored = work
			}
			if err := l.Apply(tree, fmt.Sprintf("layer%d", i), stored); err != nil {
				break
			}
		}
		if err := fstreetest.Check(tree); err != nil {
			t.Fatal(err)
		}
		want, err := describeTree(tree) // before the image may take its data
		if err != nil {
			t.Fatal(err)
		}
		img := filepath.Join(work, "out.ext4")
		wopts := ext4.Options{Identity: "fuzz", NoSync: true}
		if opts&0b10000 != 0 {
			wopts.Take = tree.DataFiles()[0]
		}
		wopts.Size = []int64{0, 4 << 20, 8 << 20, 32 << 20}[opts>>5&3]
		_, err = Write(context.Background(), tree, img, wopts)
		if errors.Is(err, errXattrSpace) || wopts.Size != 0 && errors.Is(err, ext4.ErrNoSpace) {
			return // what the layers ask for, ext4 (of that size) cannot hold
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := ext4.Check(context.Background(), img); err != nil {
			t.Fatal(err)
		}
		if err := sameTree(want, ext4test.Open(t, img)); err != nil {
			t.Fatal(err)
		}
	})
}

// treeEntry is a node of a tree and, for a regular file, its content.
type treeEntry struct {
	node    *fstree.Node
	content []byte
}

// describeTree lists a tree's nodes in walk order, with the contents of
// its files.
func describeTree(tree *fstree.Tree) ([]treeEntry, error) {
	var want []treeEntry
	err := tree.Walk(func(n *fstree.Node) error {
		e := treeEntry{node: n}
		if n.Inode().Type == fstree.TypeReg {
			var err error
			if e.content, err = fstreetest.Content(tree, n.Inode()); err != nil {
				return fmt.Errorf("%q: %w", n.Path(), err)
			}
		}
		want = append(want, e)
		return nil
	})
	return want, err
}

// sameTree compares a tree, as describeTree lists it, with the image
// written from it.
func sameTree(want []treeEntry, fsys *ext4read.FS) error {
	types := map[fstree.Type]ext4read.Type{
		fstree.TypeDir: ext4read.TypeDir, fstree.TypeReg: ext4read.TypeRegular, fstree.TypeSymlink: ext4read.TypeSymlink,
		fstree.TypeFifo: ext4read.TypeFifo, fstree.TypeChar: ext4read.TypeCharDev, fstree.TypeBlock: ext4read.TypeBlockDev,
	}
	inos := map[*fstree.Inode]uint32{}
	names := map[uint32]int{}
	i := 0
	err := fsys.Walk(fsys.Root(), func(p string, got *ext4read.Inode) error {
		if i == len(want) {
			return fmt.Errorf("%q: not in the tree", p)
		}
		n := want[i].node
		i++
		if path := n.Path(); path != p && !(path == "" && p == ".") {
			return fmt.Errorf("the image has %q where the tree has %q", p, path)
		}
		in := n.Inode()
		if ino, ok := inos[in]; ok && ino != got.Ino || !ok && names[got.Ino] > 0 {
			return fmt.Errorf("%q: inode %d, where the tree's hard links say %d", p, got.Ino, ino)
		}
		inos[in] = got.Ino
		names[got.Ino]++
		if got.Type != types[in.Type] || got.Mode != in.Mode || got.UID != in.UID || got.GID != in.GID ||
			!got.Mtime.Equal(ext4Time(in.Mtime())) || !got.Atime.Equal(ext4Time(in.Atime())) || !got.Ctime.Equal(ext4Time(in.Ctime())) ||
			in.Type.IsDevice() && (got.Major != in.Major || got.Minor != in.Minor) {
			return fmt.Errorf("%q: the image has\n %s %o %d:%d %d:%d times %v %v %v,\nthe tree\n %s %o %d:%d %d:%d times %v %v %v", p,
				got.Type, got.Mode, got.UID, got.GID, got.Major, got.Minor, got.Mtime, got.Atime, got.Ctime,
				in.Type, in.Mode, in.UID, in.GID, in.Major, in.Minor, in.Mtime(), in.Atime(), in.Ctime())
		}
		xattrs, err := fsys.Xattrs(got.Ino)
		if err != nil {
			return fmt.Errorf("%q: %w", p, err)
		}
		if !maps.EqualFunc(xattrs, in.Xattrs, func(a []byte, b string) bool { return string(a) == b }) {
			return fmt.Errorf("%q: xattrs %q, the tree's %q", p, xattrs, in.Xattrs)
		}
		switch in.Type {
		case fstree.TypeReg:
			want := want[i-1].content
			f, err := fsys.Open(got.Ino)
			if err != nil {
				return fmt.Errorf("%q: %w", p, err)
			}
			content, err := io.ReadAll(io.NewSectionReader(f, 0, f.Size()))
			if err != nil || got.Size != in.Size || !bytes.Equal(content, want) {
				return fmt.Errorf("%q: %d bytes of content (%v), the tree has %d", p, len(content), err, len(want))
			}
		case fstree.TypeSymlink:
			target, err := fsys.Readlink(got.Ino)
			if err != nil || target != in.Target() {
				return fmt.Errorf("%q: target %q (%v), the tree's %q", p, target, err, in.Target())
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if i != len(want) {
		return fmt.Errorf("%q: missing from the image", want[i].node.Path())
	}
	for in, ino := range inos {
		if in.Type != fstree.TypeDir {
			got, err := fsys.Inode(ino)
			if err != nil {
				return err
			}
			if got.Links != uint32(names[ino]) {
				return fmt.Errorf("inode %d: %d links, the tree has %d names", ino, got.Links, names[ino])
			}
		}
	}
	return nil
}

// ext4Time is a time as kiln stores it in ext4 (ext4.EncodeTime, whose
// rule TestTimes checks), read back.
func ext4Time(t time.Time) time.Time {
	lo, extra := ext4.EncodeTime(t)
	return time.Unix(int64(int32(lo))+int64(extra&3)<<32, int64(extra>>2))
}
