// Package ext4write writes an ext4 image straight from a merged tree, in
// one pass and in Go: no staging directory on the host, no e2fsprogs, no
// privileges, and the same bytes for the same tree and options on any
// machine.
//
// The layout is fixed and simple. File contents come first, each run
// where the tree's data space has it (fstree.Run.Virtual: the order the
// layers hold the files), so that the image does not depend on where the
// contents were kept, and a data file that already holds them there (a
// build's own, or kiln serve's top layer's) can become the image without
// copying a byte of them (ext4.Options.Take). The data space leaves room
// for the superblock copies (see fstree.SuperReserve); should a copy need
// more, the blocks in its way move to after the data space. Then come the
// group metadata (bitmaps and inode tables, flex_bg), the journal, and
// each inode's other blocks in inode order (inodes are numbered in the
// tree's walk order, parents first, names sorted): directories, extent
// tree and attribute blocks. Blocks are handed out in ascending order, so
// metadata goes out through a sequential buffer, and contents not in
// place move with kernel-side copies from the tree's data files. Whatever
// the image leaves free stays a hole in the output file. When the size
// asked for cannot hold the data space with the gaps replaced contents
// left, the data space is packed instead.
package ext4write

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/seqwrite"
)

var (
	errNoSpace = ext4.ErrNoSpace
	// errTakeMoves: content of the file to take lies where a superblock
	// copy goes.
	errTakeMoves = errors.New("contents in the way of a superblock copy")
)

type writer struct {
	tree   *fstree.Tree
	opts   ext4.Options
	g      geometry
	alloc  *allocator
	out    *os.File
	take   int      // the data file that is out (ext4.Options.Take), or -1
	space  int64    // blocks of the data space, which comes first
	packed *packing // the data space without gaps, if it did not fit
	srcs   []*os.File
	window window           // small reads from srcs
	meta   *seqwrite.Writer // metadata and small contents, in block order
	itable *seqwrite.Writer // inode tables, in inode order
	dirs   dirBuilder
	ents   []dirent // a directory's entries, kept for the next one
	fsSeed uint32
	uuid   [16]byte
	epoch  time.Time

	// Inodes are numbered in walk order from firstIno, at their first
	// name, and written in a second walk in the same order.
	numbers []uint32          // by fstree.Inode.ID, for directory entries; 0 until numbered
	inodes  uint32            // the inodes numbered
	links   map[uint32]uint32 // by number, of the files with more than one name

	blockBitmaps, inodeBitmaps int64   // first block of each
	itables                    []int64 // first block of each group's table
	dirsIn                     []uint32
	journal                    [60]byte // the journal inode's i_block
	raw                        [inodeSize]byte
}

// Write writes the tree as an ext4 image to out, which must not exist.
func Write(ctx context.Context, tree *fstree.Tree, out string, opts ext4.Options) (ext4.Result, error) {
	res, err := writeImage(ctx, tree, out, opts, nil)
	if errors.Is(err, errTakeMoves) {
		// Left as it was but for blocks the image does not use.
		opts.Take = ""
		res, err = writeImage(ctx, tree, out, opts, nil)
	}
	if errors.Is(err, errNoSpace) && opts.Size != 0 {
		// The data space keeps room for what later layers replaced;
		// without those gaps the content may fit the size asked for.
		// The tree alone decides, so the bytes stay reproducible.
		if p := pack(tree); p.end < tree.DataSpace()/blockSize {
			opts.Take = ""
			res, err = writeImage(ctx, tree, out, opts, p)
		}
	}
	if errors.Is(err, errNoSpace) && opts.Size != 0 {
		err = fmt.Errorf("%w (%d MiB; --size auto fits the content)", err, opts.Size>>20)
	}
	return res, err
}

// packing maps the data space to one without the gaps that replaced
// contents left: the first block of each run to where it goes.
type packing struct {
	at  map[int64]int64
	end int64
}

func pack(tree *fstree.Tree) *packing {
	type run struct{ virtual, blocks int64 }
	var runs []run
	seen := make([]bool, tree.InodeIDs())
	_ = tree.Walk(func(n *fstree.Node) error {
		in := n.Inode()
		if in.Type != fstree.TypeReg || seen[in.ID()] {
			return nil
		}
		seen[in.ID()] = true
		for _, r := range in.Data() {
			runs = append(runs, run{r.Virtual / blockSize, (r.Length + blockSize - 1) / blockSize})
		}
		return nil
	})
	sort.Slice(runs, func(i, j int) bool { return runs[i].virtual < runs[j].virtual })
	p := &packing{at: make(map[int64]int64, len(runs))}
	for _, r := range runs {
		p.at[r.virtual] = p.end
		p.end += r.blocks
	}
	return p
}

func writeImage(ctx context.Context, tree *fstree.Tree, out string, opts ext4.Options, packed *packing) (ext4.Result, error) {
	stats := tree.Stats()
	space := tree.DataSpace() / blockSize
	if packed != nil {
		space = packed.end
	}
	size := opts.Size
	if size == 0 {
		// Room for the data space, which holds what later layers
		// replaced too, rather than for the files' data alone.
		const mib = 1 << 20
		size = (ext4.AutoSize(stats) + (space-stats.DataBlocks)*blockSize + mib - 1) / mib * mib
		// More inodes than full groups hold get more full groups rather
		// than smaller ones: the data space's superblock reserves line
		// up with full groups only (see fstree.SuperReserve), and a data
		// file can then become the image. What the image leaves free
		// costs nothing: it stays a hole.
		if need := (ext4.InodeCount(stats, size) + maxPerGroup - 1) / maxPerGroup; need*maxPerGroup*blockSize > size {
			size = need * maxPerGroup * blockSize
		}
	}
	w := &writer{tree: tree, opts: opts, epoch: tree.Epoch(), space: space, packed: packed,
		numbers: make([]uint32, tree.InodeIDs())}
	w.numbers[tree.Root().Inode().ID()] = rootIno
	if err := w.number(); err != nil {
		return ext4.Result{}, err
	}
	g, err := newGeometry(size, ext4.InodeCount(stats, size))
	if err != nil {
		return ext4.Result{}, err
	}
	w.g = g
	if used := int64(firstIno-1) + int64(w.inodes); used > int64(g.inodes()) {
		return ext4.Result{}, fmt.Errorf("%w: %d inodes, the filesystem has room for %d", errNoSpace, used, g.inodes())
	}
	w.uuid = ext4.DeriveID("kiln.fs-uuid", opts.Identity)
	w.fsSeed = crc32c(^uint32(0), w.uuid[:])
	w.dirs.fsSeed = w.fsSeed
	hs := ext4.DeriveID("kiln.hash-seed", opts.Identity)
	for i := range w.dirs.hashSeed {
		w.dirs.hashSeed[i] = binary.LittleEndian.Uint32(hs[4*i:])
	}

	if space > g.blocks {
		return ext4.Result{}, fmt.Errorf("%w: the layers' data needs %d MiB", errNoSpace, space*blockSize>>20)
	}
	var f *os.File
	w.take = -1
	if opts.Take != "" && packed == nil && g.bpg == fstree.GroupBlocks && 1+g.gdtBlocks <= fstree.SuperReserve {
		w.take = slices.Index(tree.DataFiles(), opts.Take)
		if w.take >= 0 && opts.TakeKeeps && liveIn(tree, w.take) != tree.Placed(w.take) {
			w.take = -1
		}
	}
	if w.take >= 0 {
		if _, err := os.Lstat(out); err == nil {
			return ext4.Result{}, fmt.Errorf("%s: %w", out, os.ErrExist)
		}
		f, err = os.OpenFile(opts.Take, os.O_RDWR, 0)
		if err == nil {
			// Whatever an earlier build left past the data space goes.
			err = f.Truncate(space * blockSize)
		}
	} else {
		f, err = os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	}
	if err != nil {
		return ext4.Result{}, err
	}
	w.out = f
	err = w.write(ctx)
	for _, s := range w.srcs {
		s.Close()
	}
	if err == nil && !opts.NoSync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && w.take >= 0 {
		if err = os.Chmod(opts.Take, 0o644); err == nil {
			err = os.Rename(opts.Take, out)
		}
	}
	if err != nil {
		if w.take < 0 {
			os.Remove(out)
		}
		return ext4.Result{}, err
	}
	return ext4.Result{Size: g.blocks * blockSize, Inodes: stats.Inodes, UUID: ext4.DeriveUUID("kiln.fs-uuid", opts.Identity)}, nil
}

// liveIn counts the bytes of content in data file i that the tree uses.
func liveIn(tree *fstree.Tree, i int) int64 {
	var n int64
	seen := make([]bool, tree.InodeIDs())
	_ = tree.Walk(func(nd *fstree.Node) error {
		in := nd.Inode()
		if in.Type != fstree.TypeReg || seen[in.ID()] {
			return nil
		}
		seen[in.ID()] = true
		for _, r := range in.Data() {
			if r.File == i {
				n += r.Length
			}
		}
		return nil
	})
	return n
}

// number gives every inode of the tree its number, in walk order, and
// counts links.
func (w *writer) number() error {
	w.links = map[uint32]uint32{}
	return w.tree.Walk(func(n *fstree.Node) error {
		if n.Parent() == nil {
			return nil
		}
		id := n.Inode().ID()
		if ino := w.numbers[id]; ino != 0 {
			links := w.links[ino] + 1
			if links == 1 {
				links = 2 // the first name was not counted
			}
			if links > maxLinks {
				return fmt.Errorf("ext4: %q: more than %d hard links", "/"+n.Path(), maxLinks)
			}
			w.links[ino] = links
			return nil
		}
		if w.inodes == 1<<32-firstIno-1 {
			return fmt.Errorf("ext4: more than %d inodes", w.inodes)
		}
		w.numbers[id] = firstIno + w.inodes
		w.inodes++
		return nil
	})
}

// dirLinks is a directory's link count: its name, ".", and each
// subdirectory's ".."; dir_nlink's 1 past the limit.
func dirLinks(subdirs uint32) uint32 {
	if n := 2 + subdirs; n <= maxLinks {
		return n
	}
	return 1
}

func (w *writer) write(ctx context.Context) error {
	w.meta = seqwrite.New(w.out, 4<<20)
	w.itable = seqwrite.New(w.out, 1<<20)
	w.window.buf = make([]byte, 0, 2<<20)
	for i := range w.tree.DataFiles() {
		s, err := w.tree.OpenData(i)
		if err != nil {
			return err
		}
		w.srcs = append(w.srcs, s)
	}
	if err := w.out.Truncate(w.g.blocks * blockSize); err != nil {
		return err
	}
	w.alloc = newAllocator(w.g)
	// The data space comes first (see place); everything else after it.
	w.alloc.next = w.space
	var err error
	if w.blockBitmaps, err = w.alloc.contiguous(w.g.groups); err != nil {
		return err
	}
	if w.inodeBitmaps, err = w.alloc.contiguous(w.g.groups); err != nil {
		return err
	}
	w.itables = make([]int64, w.g.groups)
	for grp := range w.itables {
		if w.itables[grp], err = w.alloc.contiguous(w.g.itableBlocks); err != nil {
			return err
		}
	}
	w.dirsIn = make([]uint32, w.g.groups)

	// Reserved inodes first, the journal among them, then the root and
	// the content: inode numbers only go up, so the tables are written
	// in one sequential stream.
	for ino := uint32(1); ino < firstIno; ino++ {
		var raw []byte
		var err error
		switch ino {
		case rootIno:
			if raw, err = w.inode(ctx, ino, w.tree.Root()); err != nil {
				err = fmt.Errorf("ext4: %q: %w", "/", err)
			}
		case journalIno:
			raw, err = w.journalInode()
		default:
			raw = make([]byte, inodeSize)
		}
		if err != nil {
			return err
		}
		if err := w.putInode(ino, raw); err != nil {
			return err
		}
	}
	next := uint32(firstIno)
	err = w.tree.Walk(func(n *fstree.Node) error {
		ino := w.numbers[n.Inode().ID()]
		if n.Parent() == nil || ino != next {
			return nil // the root, or a name after an inode's first
		}
		next++
		if ino%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		raw, err := w.inode(ctx, ino, n)
		if err != nil {
			return fmt.Errorf("ext4: %q: %w", "/"+n.Path(), err)
		}
		return w.putInode(ino, raw)
	})
	if err != nil {
		return err
	}
	if w.take >= 0 {
		// What later layers replaced reads as zeros, as it would in an
		// image written afresh.
		if err := w.punchFree(w.space); err != nil {
			return err
		}
	}
	if err := w.finish(); err != nil {
		return err
	}
	if err := w.meta.Flush(); err != nil {
		return err
	}
	return w.itable.Flush()
}

var fileTypes = map[fstree.Type]uint8{
	fstree.TypeDir:     ftDir,
	fstree.TypeReg:     ftReg,
	fstree.TypeSymlink: ftSymlink,
	fstree.TypeFifo:    ftFifo,
	fstree.TypeChar:    ftChar,
	fstree.TypeBlock:   ftBlock,
}

// inode lays out the blocks of the inode named n, writes them, and
// returns the inode.
func (w *writer) inode(ctx context.Context, ino uint32, n *fstree.Node) ([]byte, error) {
	le := binary.LittleEndian
	in := n.Inode()
	raw := w.raw[:] // copied into the inode table by putInode
	clear(raw)
	le.PutUint16(raw[0x0:], uint16(in.Type.FileType()|in.Mode&0o7777))
	le.PutUint16(raw[0x2:], uint16(in.UID))
	le.PutUint16(raw[0x78:], uint16(in.UID>>16))
	le.PutUint16(raw[0x18:], uint16(in.GID))
	le.PutUint16(raw[0x7A:], uint16(in.GID>>16))
	putTime(raw, 0x08, 0x8C, in.Atime())
	putTime(raw, 0x0C, 0x84, in.Ctime())
	putTime(raw, 0x10, 0x88, in.Mtime())
	putTime(raw, 0x90, 0x94, w.epoch) // creation: when the image was made
	le.PutUint16(raw[0x80:], extraIsize)

	var size, blocks int64
	var flags uint32
	var exts []extent
	links := uint32(1)
	if l, ok := w.links[ino]; ok {
		links = l
	}
	switch in.Type {
	case fstree.TypeDir:
		ents := w.ents[:0]
		var subdirs uint32
		for c := range n.Children() {
			ents = append(ents, dirent{name: c.Name(), ino: w.numbers[c.Inode().ID()], ftype: fileTypes[c.Inode().Type]})
			if c.Inode().Type == fstree.TypeDir {
				subdirs++
			}
		}
		links = dirLinks(subdirs)
		parent := uint32(rootIno)
		if p := n.Parent(); p != nil {
			parent = w.numbers[p.Inode().ID()]
		}
		data, indexed, err := w.dirs.build(ino, parent, ents)
		w.ents = ents
		if err != nil {
			return nil, err
		}
		if indexed {
			flags |= flagIndex
		}
		pieces, err := w.alloc.blocks(int64(len(data)))
		if err != nil {
			return nil, err
		}
		i := 0
		for _, p := range pieces {
			for b := p.start; b < p.start+p.length; b++ {
				if err := w.meta.WriteAt(data[i], b*blockSize); err != nil {
					return nil, err
				}
				i++
			}
		}
		exts = extentsFor([]span{{0, int64(len(data))}}, pieces)
		size, blocks = int64(len(data))*blockSize, int64(len(data))
		w.dirsIn[(ino-1)/w.g.ipg]++
	case fstree.TypeReg:
		var err error
		if exts, err = w.fileData(ctx, in); err != nil {
			return nil, err
		}
		size, blocks = in.Size, in.Blocks()
	case fstree.TypeSymlink:
		if len(in.Target()) < 60 {
			copy(raw[0x28:], in.Target())
			size = int64(len(in.Target()))
			break
		}
		pieces, err := w.alloc.blocks(1)
		if err != nil {
			return nil, err
		}
		b := make([]byte, blockSize)
		copy(b, in.Target())
		if err := w.meta.WriteAt(b, pieces[0].start*blockSize); err != nil {
			return nil, err
		}
		exts = extentsFor([]span{{0, 1}}, pieces)
		size, blocks = int64(len(in.Target())), 1
	case fstree.TypeChar, fstree.TypeBlock:
		b0, b1 := ext4.EncodeDevice(in.Major, in.Minor)
		le.PutUint32(raw[0x28:], b0)
		le.PutUint32(raw[0x2C:], b1)
	}
	if exts != nil || in.Type == fstree.TypeReg || in.Type == fstree.TypeDir {
		flags |= flagExtents
		treeBlocks, err := w.extentTree(ino, exts, raw[0x28:0x64])
		if err != nil {
			return nil, err
		}
		blocks += treeBlocks
	}
	if err := w.xattrs(ino, in, raw, &blocks); err != nil {
		return nil, err
	}
	le.PutUint16(raw[0x1A:], uint16(links))
	le.PutUint32(raw[0x04:], uint32(size))
	le.PutUint32(raw[0x6C:], uint32(size>>32))
	sectors := blocks * (blockSize / 512)
	le.PutUint32(raw[0x1C:], uint32(sectors))
	le.PutUint16(raw[0x74:], uint16(sectors>>32))
	le.PutUint32(raw[0x20:], flags)
	return raw, nil
}

// xattrs stores an inode's extended attributes: in the inode as far as
// they fit, the rest in a block of its own.
func (w *writer) xattrs(ino uint32, in *fstree.Inode, raw []byte, blocks *int64) error {
	if len(in.Xattrs) == 0 {
		return nil
	}
	xs, err := encodeXattrs(in.Xattrs)
	if err != nil {
		return err
	}
	inInode, inBlock, err := splitXattrs(xs)
	if err != nil {
		return err
	}
	inodeXattrs(raw, inInode)
	if len(inBlock) == 0 {
		return nil
	}
	pieces, err := w.alloc.blocks(1)
	if err != nil {
		return err
	}
	blk := pieces[0].start
	if err := w.meta.WriteAt(xattrBlock(inBlock, blk, w.fsSeed), blk*blockSize); err != nil {
		return err
	}
	binary.LittleEndian.PutUint32(raw[0x68:], uint32(blk))
	binary.LittleEndian.PutUint16(raw[0x76:], uint16(blk>>32))
	*blocks++
	return nil
}

// smallCopy is the size up to which contents are read and written
// through the sequential buffer; larger ones are copied by the kernel.
const smallCopy = 256 << 10

// fileData places a regular file's blocks, copies its content there and
// returns its extents. Holes (the blocks no data run covers) get none.
func (w *writer) fileData(ctx context.Context, in *fstree.Inode) ([]extent, error) {
	if len(in.Data()) == 0 {
		return nil, nil
	}
	spans := make([]span, 0, len(in.Data()))
	var pieces []piece
	for _, r := range in.Data() {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if r.File < 0 || r.File >= len(w.srcs) {
			return nil, fmt.Errorf("no data file %d", r.File)
		}
		n := (r.Length + blockSize - 1) / blockSize
		spans = append(spans, span{r.Offset / blockSize, n})
		ps, err := w.place(r, n)
		if err != nil {
			return nil, err
		}
		pieces = append(pieces, ps...)
	}
	return extentsFor(spans, pieces), nil
}

// place puts the n blocks of a run where the data space (packed, if it
// is) has them, except those that fall on a superblock copy, which go
// after the data space, and copies the run's content there, unless it
// already is in place (the tree's own data file is the image).
func (w *writer) place(r fstree.Run, n int64) ([]piece, error) {
	var out []piece
	put := func(p piece, done int64) error {
		out = append(out, p)
		from := done * blockSize
		length := min(p.length*blockSize, r.Length-from)
		if r.File == w.take && p.start*blockSize == r.DataOffset+from {
			return nil
		}
		return w.copyData(w.srcs[r.File], p.start*blockSize, r.DataOffset+from, length)
	}
	v := r.Virtual / blockSize
	if w.packed != nil {
		v = w.packed.at[v]
	}
	for done := int64(0); done < n; {
		b := v + done
		if end := w.alloc.reservedEnd(b); end != b {
			if r.File == w.take {
				// Moving it would change the taken file under whoever
				// reads the layer's contents from it.
				return nil, errTakeMoves
			}
			moved, err := w.alloc.blocks(min(end-b, n-done))
			if err != nil {
				return nil, err
			}
			for _, p := range moved {
				if err := put(p, done); err != nil {
					return nil, err
				}
				done += p.length
			}
			continue
		}
		k := min(n-done, w.alloc.nextReserved(b)-b)
		w.alloc.mark(b, k)
		if err := put(piece{b, k}, done); err != nil {
			return nil, err
		}
		done += k
	}
	return out, nil
}

func (w *writer) copyData(src *os.File, at, from, n int64) error {
	if n > smallCopy {
		return clone.Range(w.out, src, at, from, n)
	}
	b, err := w.window.read(src, from, n)
	if err != nil {
		return fmt.Errorf("reading content: %w", err)
	}
	return w.meta.WriteAt(b, at)
}

// window reads small contents from the data files through a buffer:
// files are laid out in about the order their contents lie in the
// layers, so a read just ahead of the last one reads ahead a whole
// buffer, and the reads after it are served from memory. A read
// elsewhere reads only what it needs.
type window struct {
	f   *os.File
	off int64
	buf []byte
}

func (r *window) read(f *os.File, from, n int64) ([]byte, error) {
	end := r.off + int64(len(r.buf))
	if f != r.f || from < r.off || from+n > end {
		size := n
		if f == r.f && from >= r.off && from < end+int64(cap(r.buf)) {
			size = int64(cap(r.buf))
		}
		r.f, r.buf = f, r.buf[:size]
		m, err := f.ReadAt(r.buf, from)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		r.off, r.buf = from, r.buf[:m]
		if int64(m) < n {
			return nil, io.ErrUnexpectedEOF
		}
	}
	return r.buf[from-r.off : from-r.off+n], nil
}

// punchFree turns the free blocks below end into holes.
func (w *writer) punchFree(end int64) error {
	for b := int64(0); b < end; {
		if w.alloc.used(b) {
			b++
			continue
		}
		start := b
		for b < end && !w.alloc.used(b) {
			b++
		}
		err := unix.Fallocate(int(w.out.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, start*blockSize, (b-start)*blockSize)
		if err != nil {
			return fmt.Errorf("freeing replaced contents: %w", err)
		}
	}
	return nil
}

// putInode checksums an inode and adds it to its inode table.
func (w *writer) putInode(ino uint32, raw []byte) error {
	le := binary.LittleEndian
	le.PutUint16(raw[0x7C:], 0)
	le.PutUint16(raw[0x82:], 0)
	c := crc32c(inodeSeed(w.fsSeed, ino, 0), raw)
	le.PutUint16(raw[0x7C:], uint16(c))
	if le.Uint16(raw[0x80:]) >= 4 { // the extra fields hold the high half
		le.PutUint16(raw[0x82:], uint16(c>>16))
	}
	grp, idx := int64(ino-1)/int64(w.g.ipg), int64(ino-1)%int64(w.g.ipg)
	return w.itable.WriteAt(raw, w.itables[grp]*blockSize+idx*inodeSize)
}

// putTime stores a time in an inode's seconds field and extra field.
func putTime(raw []byte, lo, extra int, t time.Time) {
	l, x := ext4.EncodeTime(t)
	binary.LittleEndian.PutUint32(raw[lo:], l)
	binary.LittleEndian.PutUint32(raw[extra:], x)
}

// Writer is this package as a build.Writer.
type Writer struct{}

func (Writer) Name() string { return "kiln" }
func (Writer) Staged() bool { return false }
func (Writer) Write(ctx context.Context, tree *fstree.Tree, out string, opts ext4.Options) (ext4.Result, error) {
	return Write(ctx, tree, out, opts)
}
