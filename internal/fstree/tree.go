// Package fstree merges image layers into one root filesystem: an in-memory
// tree holding every entry's metadata exactly as the layer tars say, data
// files holding the contents of its regular files and, for the e2fsprogs
// writer only, a staging directory holding its names.
//
// The contents go into the tree's own data file, each file's on a block
// boundary at its place in the data space (see Run.Virtual), holes left
// out; or stay in a stored layer's data file, laid out the same way (see
// StoreLayer), or where they are in a layer tar stored uncompressed
// (ApplyStored). The ext4 writer copies them straight to the blocks the
// image gives each file, or makes one of those data files the image.
//
// The staging directory is the tree's shape only: directories, symlinks,
// fifos, hard links and a placeholder without data for every regular
// file, which is all mke2fs needs to lay out the names. Nothing is
// written with privileges: files are owned by whoever runs kiln, modes
// are kept owner-writable, device nodes and extended attributes are not
// created at all. The tree is the authority on metadata; the e2fsprogs
// writer restores it afterwards. This is what makes the result the same
// whether kiln runs as root or not.
package fstree

import (
	"errors"
	"fmt"
	"iter"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
	"unsafe"
)

// Type is the kind of a filesystem entry.
type Type uint8

const (
	TypeDir Type = iota + 1
	TypeReg
	TypeSymlink
	TypeFifo
	TypeChar
	TypeBlock
)

func (t Type) String() string {
	switch t {
	case TypeDir:
		return "directory"
	case TypeReg:
		return "regular file"
	case TypeSymlink:
		return "symlink"
	case TypeFifo:
		return "fifo"
	case TypeChar:
		return "character device"
	case TypeBlock:
		return "block device"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// IsDevice reports whether entries of this type are device nodes, which an
// unprivileged writer cannot create in the staging directory.
func (t Type) IsDevice() bool { return t == TypeChar || t == TypeBlock }

// FileType returns the file type bits of an inode's mode (S_IFMT), as
// ext4 and stat(2) store them.
func (t Type) FileType() uint32 {
	switch t {
	case TypeDir:
		return 0o040000
	case TypeReg:
		return 0o100000
	case TypeSymlink:
		return 0o120000
	case TypeFifo:
		return 0o010000
	case TypeChar:
		return 0o020000
	case TypeBlock:
		return 0o060000
	}
	return 0
}

// Inode is the metadata of one file. Hard links share one Inode.
//
// An image may have millions of them: the fields are ordered to leave
// little padding, the times take 12 bytes each (see stamp), and what
// only some inodes have is kept apart (see more).
type Inode struct {
	Type         Type
	Mode         uint32 // permission bits including setuid, setgid and sticky (07777)
	UID, GID     uint32
	Major, Minor uint32
	id           uint32 // see ID

	mtime, atime, ctime stamp

	Xattrs map[string]string
	Size   int64 // regular files: logical size
	more   *more
}

// more is what only some inodes have, kept apart so that the others do
// not pay for it: a symlink's target, a regular file's runs.
type more struct {
	target string
	runs   []Run
	one    [1]Run // the runs of a file with one, without another allocation
}

// Target returns a symlink's target, verbatim.
func (in *Inode) Target() string {
	if in.more == nil {
		return ""
	}
	return in.more.target
}

// Data locates a regular file's content in the tree's data files, in
// file order; what no run covers is a hole.
func (in *Inode) Data() []Run {
	if in.more == nil {
		return nil
	}
	return in.more.runs
}

// setData sets a regular file's runs, copying them.
func (in *Inode) setData(runs []Run) {
	if len(runs) == 0 {
		in.more = nil
		return
	}
	m := &more{}
	if len(runs) == 1 {
		m.one[0] = runs[0]
		m.runs = m.one[:]
	} else {
		m.runs = slices.Clone(runs)
	}
	in.more = m
}

// ID numbers the inode among those of its tree, from 0 up to the tree's
// InodeIDs: a writer can keep what it knows of each inode in a slice,
// which costs far less than a map for millions of them.
func (in *Inode) ID() int { return int(in.id) }

// Mtime, Atime and Ctime return the inode's times, to the nanosecond.
func (in *Inode) Mtime() time.Time { return in.mtime.time() }
func (in *Inode) Atime() time.Time { return in.atime.time() }
func (in *Inode) Ctime() time.Time { return in.ctime.time() }

func (in *Inode) setTimes(mtime, atime, ctime time.Time) {
	in.mtime, in.atime, in.ctime = makeStamp(mtime), makeStamp(atime), makeStamp(ctime)
}

// Blocks counts the 4 KiB blocks that hold a regular file's data, holes
// excluded.
func (in *Inode) Blocks() int64 {
	var n int64
	for _, r := range in.Data() {
		n += (r.Length + blockSize - 1) / blockSize
	}
	return n
}

// stamp is a time in 12 bytes, where time.Time takes 24: all of Unix's
// 64-bit seconds, before 1970 and after 2038 alike, in two halves (so
// that it packs between 4-byte fields), and the nanoseconds.
type stamp struct{ lo, hi, nsec uint32 }

func makeStamp(t time.Time) stamp {
	sec := t.Unix()
	return stamp{lo: uint32(sec), hi: uint32(sec >> 32), nsec: uint32(t.Nanosecond())}
}

func (s stamp) time() time.Time {
	return time.Unix(int64(s.hi)<<32|int64(s.lo), int64(s.nsec))
}

// Run is a stretch of a regular file's content: Length bytes at file
// offset Offset, stored at DataOffset in data file File (an index into
// Tree.DataFiles). Offset is a multiple of the block size, and so is
// Length except where the run ends the file.
//
// Virtual is where the run lies in the tree's data space: every run of
// every file the layers held, in the order they came, each on a block
// boundary, holes left out. It depends on the layers only, not on where
// their contents are kept, so a writer can lay files out by it and get
// the same image either way. The tree's own data file mirrors it: a run
// kept there has DataOffset equal to Virtual.
type Run struct {
	Offset, Length int64
	File           int
	DataOffset     int64
	Virtual        int64
}

// XattrNames returns the extended attribute names in a stable order.
func (in *Inode) XattrNames() []string {
	names := make([]string, 0, len(in.Xattrs))
	for k := range in.Xattrs {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// Names returns the nodes that link to a device inode, first one first:
// the staging directory cannot hold device nodes, so the e2fsprogs writer
// needs every name to create the links itself.
func (t *Tree) Names(in *Inode) []*Node { return t.deviceNames[in] }

// Node is one name in the tree.
type Node struct {
	// name is nameLen bytes in the tree's name arena (see names): a
	// name costs its bytes, not a string header and an allocation too.
	name     *byte
	parent   *Node
	children *children // directories only
	inode    *Inode
	// layer is the index of the layer that created this name. Whiteouts
	// and opaque directories only hide names from lower layers.
	layer   int32
	nameLen uint8 // names are at most maxNameLen bytes
}

// namedInode is an inode and its first name in one allocation: most
// inodes have one name, and a node alone is a third of the pair.
type namedInode struct {
	Node
	inode Inode
}

// Name returns the node's name within its parent ("" for the root).
func (n *Node) Name() string { return unsafe.String(n.name, n.nameLen) }

// Parent returns the directory holding the node (nil for the root).
func (n *Node) Parent() *Node { return n.parent }

// Inode returns the node's metadata.
func (n *Node) Inode() *Inode { return n.inode }

// Child returns the named child of a directory node, or nil.
func (n *Node) Child(name string) *Node {
	if n.children == nil {
		return nil
	}
	return n.children.get(name)
}

// Children returns the nodes in a directory node, sorted bytewise by
// name. The directory must not change while the loop runs.
func (n *Node) Children() iter.Seq[*Node] {
	return func(yield func(*Node) bool) {
		if n.children == nil {
			return
		}
		n.children.each(yield)
	}
}

// ChildNames returns the names in a directory node, sorted bytewise.
func (n *Node) ChildNames() []string {
	var names []string
	for c := range n.Children() {
		names = append(names, c.Name())
	}
	return names
}

// maxSorted is the most names a directory keeps in a sorted slice (a
// pointer each) before it moves them to a map: adding a name to the
// slice moves those after it, which a layer that lists many names in
// reverse order would make quadratic.
const maxSorted = 1024

// children are the names in a directory: in a slice sorted by name while
// there are few, in a map once there are many.
type children struct {
	sorted []*Node
	byName map[string]*Node
}

// search returns where name is or would go in c.sorted.
func (c *children) search(name string) (int, bool) {
	return slices.BinarySearchFunc(c.sorted, name, func(n *Node, name string) int {
		return strings.Compare(n.Name(), name)
	})
}

func (c *children) get(name string) *Node {
	if c.byName != nil {
		return c.byName[name]
	}
	if i, ok := c.search(name); ok {
		return c.sorted[i]
	}
	return nil
}

// add adds n, whose name c does not have yet.
func (c *children) add(n *Node) {
	if c.byName != nil {
		c.byName[n.Name()] = n
		return
	}
	if len(c.sorted) == maxSorted {
		c.byName = make(map[string]*Node, 2*maxSorted)
		for _, m := range c.sorted {
			c.byName[m.Name()] = m
		}
		c.byName[n.Name()] = n
		c.sorted = nil
		return
	}
	i, _ := c.search(n.Name())
	c.sorted = slices.Insert(c.sorted, i, n)
}

func (c *children) remove(name string) {
	if c.byName != nil {
		delete(c.byName, name)
	} else if i, ok := c.search(name); ok {
		c.sorted = slices.Delete(c.sorted, i, i+1)
	}
}

func (c *children) each(yield func(*Node) bool) {
	nodes := c.sorted
	if c.byName != nil {
		nodes = slices.SortedFunc(maps.Values(c.byName), func(a, b *Node) int {
			return strings.Compare(a.Name(), b.Name())
		})
	}
	for _, n := range nodes {
		if !yield(n) {
			return
		}
	}
}

// names is an arena for the nodes' names and the symlinks' targets:
// chunks that are only ever appended to, so that the bytes a string
// points to never change. A string kept there costs its bytes only.
type names struct{ chunk []byte }

const namesChunk = 64 << 10 // more than a name or a target (maxLinkLen)

func (a *names) add(s string) string {
	if s == "" {
		return ""
	}
	if len(s) > cap(a.chunk)-len(a.chunk) {
		a.chunk = make([]byte, 0, namesChunk)
	}
	at := len(a.chunk)
	a.chunk = append(a.chunk, s...)
	return unsafe.String(&a.chunk[at], len(s))
}

// Path returns the node's path relative to the root, "/"-separated, "" for
// the root itself.
func (n *Node) Path() string {
	if n.parent == nil {
		return ""
	}
	var parts []string
	for c := n; c.parent != nil; c = c.parent {
		parts = append(parts, c.Name())
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return strings.Join(parts, "/")
}

// Stats summarises a tree for sizing the filesystem that will hold it.
type Stats struct {
	Inodes        int64 // distinct inodes, root included
	DataBlocks    int64 // 4 KiB blocks of file data
	DirEntryBytes int64 // bytes of directory entries, as ext4 lays them out
	Dirs          int64
	LongSymlinks  int64 // symlinks whose target does not fit in the inode
	XattrBlocks   int64 // inodes whose xattrs need a block of their own
}

// Tree is a root filesystem being assembled from layers.
type Tree struct {
	root    *Node
	staging string
	data    []dataFile // data files; the first is the tree's own
	space   dataSpace  // see Run.Virtual
	epoch   time.Time
	layers  int

	inodes      uint32 // IDs given so far
	deviceNames map[*Inode][]*Node
	names       names

	limits     Limits
	imageBytes int64 // uncompressed bytes of the layers applied
	entries    int64 // entries of the layers applied

	// links remembers where symlinks lead (see applier.follow) while
	// linksGen is gen, which changes whenever one might lead elsewhere.
	links         map[linkKey]resolvedLink
	gen, linksGen uint64
	// walked counts the path components resolved: what bounds the work
	// a crafted layer can ask for, entry by entry.
	walked int64
}

// New returns an empty tree staged in dir, which must be an empty directory
// owned by the caller, with file contents in data, which must not exist
// yet. epoch is the time given to directories that no layer describes (the
// root, parents that a layer leaves implicit), so that the result does not
// depend on when it was built.
//
// With dir empty, nothing is staged: the tree lives in memory and in its
// data files only, which is all a writer that lays out ext4 itself needs.
func New(dir, data string, epoch time.Time) (*Tree, error) {
	if dir != "" {
		st, err := os.Lstat(dir)
		if err != nil {
			return nil, fmt.Errorf("staging directory: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("staging directory %s is not a directory", dir)
		}
	}
	f, err := os.OpenFile(data, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data file: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("data file: %w", err)
	}
	t := &Tree{staging: dir, data: []dataFile{{paths: []string{data}}}, epoch: epoch}
	t.root = t.newNode("", t.implicitDir(), 0)
	return t, nil
}

func (t *Tree) implicitDir() Inode {
	in := Inode{Type: TypeDir, Mode: 0o755}
	in.setTimes(t.epoch, t.epoch, t.epoch)
	return in
}

// newNode makes a node named name for a new inode, which it gives the
// next ID.
func (t *Tree) newNode(name string, in Inode, layer int) *Node {
	ni := &namedInode{inode: in}
	ni.inode.id = t.inodes
	t.inodes++
	ni.Node.inode = &ni.inode
	t.name(&ni.Node, name, layer)
	return &ni.Node
}

// newLink makes a node named name for an inode that has a name already.
func (t *Tree) newLink(name string, in *Inode, layer int) *Node {
	n := &Node{inode: in}
	t.name(n, name, layer)
	return n
}

func (t *Tree) name(n *Node, name string, layer int) {
	name = t.names.add(name)
	n.name, n.nameLen = unsafe.StringData(name), uint8(len(name))
	n.layer = int32(layer)
	if n.inode.Type == TypeDir {
		n.children = &children{}
	}
}

// InodeIDs bounds the IDs of the tree's inodes (see Inode.ID).
func (t *Tree) InodeIDs() int { return int(t.inodes) }

// SetLimits caps what the layers applied from now on may do (see
// Limits); a tree starts without limits.
func (t *Tree) SetLimits(l Limits) { t.limits = l }

// Root returns the root directory node.
func (t *Tree) Root() *Node { return t.root }

func (t *Tree) staged() bool { return t.staging != "" }

// StagingDir returns the directory holding the tree's names, "" if the
// tree is not staged.
func (t *Tree) StagingDir() string { return t.staging }

// DataFiles returns the files holding the contents of the regular files
// (see Run.File), each by the first of its names.
func (t *Tree) DataFiles() []string {
	names := make([]string, len(t.data))
	for i, d := range t.data {
		names[i] = d.paths[0]
	}
	return names
}

// dataFile is where a data file is: the first of its names that exists
// (a stored layer's data file is renamed once made an image).
type dataFile struct {
	paths []string
	// placed counts the bytes of content placed in it.
	placed int64
}

// Placed returns how many bytes of content data file i (see Run.File)
// holds, whether or not the tree still uses them.
func (t *Tree) Placed(i int) int64 { return t.data[i].placed }

// OpenData opens data file i (see Run.File) for reading.
func (t *Tree) OpenData(i int) (*os.File, error) {
	paths := t.data[i].paths
	var err error
	// Twice round: a file renamed from a later name to an earlier one
	// while the first round looked.
	for range 2 {
		for _, p := range paths {
			var f *os.File
			if f, err = os.Open(p); err == nil || !errors.Is(err, os.ErrNotExist) {
				return f, err
			}
		}
	}
	return nil, err
}

// DataSpace returns the size of the tree's data space (see Run.Virtual),
// a multiple of the block size.
func (t *Tree) DataSpace() int64 { return t.space.end }

// Epoch returns the time given to entries no layer describes.
func (t *Tree) Epoch() time.Time { return t.epoch }

// StagingPath returns where a node lives in the staging directory.
func (t *Tree) StagingPath(n *Node) string {
	p := n.Path()
	if p == "" {
		return t.staging
	}
	return filepath.Join(t.staging, p)
}

// Lookup returns the node at a clean relative path without following
// symlinks, or nil.
func (t *Tree) Lookup(path string) *Node {
	n := t.root
	if path == "" || path == "." {
		return n
	}
	for _, c := range strings.Split(path, "/") {
		if n = n.Child(c); n == nil {
			return nil
		}
	}
	return n
}

// Walk calls fn for every node, parents before children, children in
// bytewise name order. fn must not change the tree.
func (t *Tree) Walk(fn func(n *Node) error) error {
	var walk func(n *Node) error
	walk = func(n *Node) error {
		if err := fn(n); err != nil {
			return err
		}
		for c := range n.Children() {
			if err := walk(c); err != nil {
				return err
			}
		}
		return nil
	}
	return walk(t.root)
}

// Stats computes what the builder needs to size a filesystem for the tree.
func (t *Tree) Stats() Stats {
	var s Stats
	seen := make([]bool, t.InodeIDs())
	_ = t.Walk(func(n *Node) error {
		in := n.inode
		if n.parent != nil {
			// ext4 directory entry: 8 bytes of header plus the name,
			// rounded up to 4 bytes.
			s.DirEntryBytes += int64(8+int(n.nameLen)+3) &^ 3
		}
		if seen[in.id] {
			return nil
		}
		seen[in.id] = true
		s.Inodes++
		switch in.Type {
		case TypeDir:
			s.Dirs++
		case TypeReg:
			s.DataBlocks += in.Blocks()
		case TypeSymlink:
			if len(in.Target()) >= 60 {
				s.LongSymlinks++
			}
		}
		// An entry takes 16 bytes, its name and its value, each padded to
		// 4 bytes (counting the whole name, though ext4 stores most
		// prefixes as a number, errs on the safe side). A 256-byte
		// inode with 32 extra bytes leaves 88 for them.
		var xsize int
		for k, v := range in.Xattrs {
			xsize += 16 + (len(k)+3)&^3 + (len(v)+3)&^3
		}
		if xsize > 88 {
			s.XattrBlocks++
		}
		return nil
	})
	return s
}
