// Package fstree merges image layers into one root filesystem: an in-memory
// tree holding every entry's metadata exactly as the layer tars say, data
// files holding the contents of its regular files and, for the e2fsprogs
// writer only, a staging directory holding its names.
//
// The contents stay where they are when the layer tar is stored
// uncompressed (ApplyStored), or go into the tree's own data file, each
// file's on a block boundary, holes left out; either way the ext4 writer
// copies them straight to the blocks the image gives each file, leaving
// holes where the content has whole zero blocks.
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
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
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
type Inode struct {
	Type     Type
	Mode     uint32 // permission bits including setuid, setgid and sticky (07777)
	UID, GID uint32
	Mtime    time.Time
	Atime    time.Time
	Ctime    time.Time
	Xattrs   map[string]string
	Major    uint32
	Minor    uint32
	Target   string // symlink target, verbatim
	Size     int64  // regular files: logical size
	Blocks   int64  // regular files: 4 KiB blocks holding data (holes excluded)
	// Data locates a regular file's content in the tree's data files,
	// in file order; what no run covers is a hole.
	Data []Run

	id uint32 // see ID
}

// ID numbers the inode among those of its tree, from 0 up to the tree's
// InodeIDs: a writer can keep what it knows of each inode in a slice,
// which costs far less than a map for millions of them.
func (in *Inode) ID() int { return int(in.id) }

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
	name     string
	parent   *Node
	children map[string]*Node
	inode    *Inode
	// layer is the index of the layer that created this name. Whiteouts
	// and opaque directories only hide names from lower layers.
	layer int
}

// Name returns the node's name within its parent ("" for the root).
func (n *Node) Name() string { return n.name }

// Parent returns the directory holding the node (nil for the root).
func (n *Node) Parent() *Node { return n.parent }

// Inode returns the node's metadata.
func (n *Node) Inode() *Inode { return n.inode }

// Child returns the named child of a directory node, or nil.
func (n *Node) Child(name string) *Node { return n.children[name] }

// ChildNames returns the names in a directory node, sorted bytewise.
func (n *Node) ChildNames() []string {
	names := make([]string, 0, len(n.children))
	for k := range n.children {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// Path returns the node's path relative to the root, "/"-separated, "" for
// the root itself.
func (n *Node) Path() string {
	if n.parent == nil {
		return ""
	}
	var parts []string
	for c := n; c.parent != nil; c = c.parent {
		parts = append(parts, c.name)
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
	data    []string // data files; the first is the tree's own
	dataEnd int64    // the end of the data space (see Run.Virtual)
	epoch   time.Time
	layers  int

	inodes      uint32 // IDs given so far
	deviceNames map[*Inode][]*Node

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
// owned by the caller, with file contents in dataFile, which must not exist
// yet. epoch is the time given to directories that no layer describes (the
// root, parents that a layer leaves implicit), so that the result does not
// depend on when it was built.
//
// With dir empty, nothing is staged: the tree lives in memory and in its
// data files only, which is all a writer that lays out ext4 itself needs.
func New(dir, dataFile string, epoch time.Time) (*Tree, error) {
	if dir != "" {
		st, err := os.Lstat(dir)
		if err != nil {
			return nil, fmt.Errorf("staging directory: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("staging directory %s is not a directory", dir)
		}
	}
	f, err := os.OpenFile(dataFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data file: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("data file: %w", err)
	}
	t := &Tree{staging: dir, data: []string{dataFile}, epoch: epoch}
	t.root = &Node{children: map[string]*Node{}, inode: t.implicitDir()}
	return t, nil
}

func (t *Tree) implicitDir() *Inode {
	return t.newInode(&Inode{Type: TypeDir, Mode: 0o755, Mtime: t.epoch, Atime: t.epoch, Ctime: t.epoch})
}

// newInode gives in the next ID.
func (t *Tree) newInode(in *Inode) *Inode {
	in.id = t.inodes
	t.inodes++
	return in
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
// (see Run.File).
func (t *Tree) DataFiles() []string { return t.data }

// DataSpace returns the size of the tree's data space (see Run.Virtual),
// a multiple of the block size.
func (t *Tree) DataSpace() int64 { return t.dataEnd }

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
		if n.children == nil {
			return nil
		}
		n = n.children[c]
		if n == nil {
			return nil
		}
	}
	return n
}

// Walk calls fn for every node, parents before children, children in
// bytewise name order.
func (t *Tree) Walk(fn func(n *Node) error) error {
	var walk func(n *Node) error
	walk = func(n *Node) error {
		if err := fn(n); err != nil {
			return err
		}
		for _, name := range n.ChildNames() {
			if err := walk(n.children[name]); err != nil {
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
	seen := map[*Inode]bool{}
	_ = t.Walk(func(n *Node) error {
		in := n.inode
		if n.parent != nil {
			// ext4 directory entry: 8 bytes of header plus the name,
			// rounded up to 4 bytes.
			s.DirEntryBytes += int64(8+len(n.name)+3) &^ 3
		}
		if seen[in] {
			return nil
		}
		seen[in] = true
		s.Inodes++
		switch in.Type {
		case TypeDir:
			s.Dirs++
		case TypeReg:
			s.DataBlocks += in.Blocks
		case TypeSymlink:
			if len(in.Target) >= 60 {
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
