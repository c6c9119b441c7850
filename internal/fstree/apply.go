package fstree

import (
	"archive/tar"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/chunk"
	"github.com/kilnfs/kiln/internal/seqwrite"
)

// OCI whiteout markers (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	opaqueMarker   = ".wh..wh..opq"
)

const (
	blockSize   = 4096
	maxNameLen  = 255  // ext4 directory entry limit
	maxLinkLen  = 4095 // ext4 symlink target limit with 4 KiB blocks
	maxSymlinks = 40   // like the kernel's MAXSYMLINKS
)

// ErrUnsafePath is wrapped by errors for entries that would reach outside
// the root filesystem.
var ErrUnsafePath = errors.New("unsafe path")

// writeBehind is how much of a data file is written before its writeback
// is started (seqwrite.WriteBehind): the image is synced once built, and
// by then most of a large one is on the disk.
const writeBehind = 32 << 20

// EntryError reports a problem with one entry of a layer.
type EntryError struct {
	Layer string // layer digest, or another name the caller gave the layer
	Entry string // entry name as written in the tar
	Err   error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("layer %s: entry %q: %v", e.Layer, e.Entry, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

type applier struct {
	ctx   context.Context
	t     *Tree
	layer int
	name  string
	buf   []byte
	// meter counts the layer's bytes as the tar reader takes them.
	meter *meter
	// data is the tree's own data file, opened at the first content, and
	// written through dataW: files come one after another, so small ones
	// cost no system call each.
	data  *os.File
	dataW *seqwrite.Writer
	// stored is the index in t.data of the file that holds the layer
	// tar itself, -1 if none; pos counts the tar's bytes read so far.
	stored int
	pos    *countingReader
	runs   []Run // writeFile's, kept for the next file
	// replay, when set, is the record of a stored layer's regular file
	// being replayed (see ApplyStoredLayer): its content is placed.
	replay *replayed
}

// Apply replays one layer, an uncompressed tar stream, on top of the tree
// with OCI semantics: entries replace what lower layers had at the same
// path (a directory over a directory merges), ".wh.NAME" removes NAME from
// lower layers and ".wh..wh..opq" hides everything lower layers put in its
// directory. layer names the layer in errors.
func (t *Tree) Apply(ctx context.Context, r io.Reader, layer string) error {
	return t.apply(ctx, r, layer, "")
}

// ApplyStored is Apply for a layer whose uncompressed tar r is also, byte
// for byte, the file at storedAt, as it will be when the tree is built:
// the contents of its regular files are then taken from there instead of
// being copied into the tree's data file.
func (t *Tree) ApplyStored(ctx context.Context, r io.Reader, layer, storedAt string) error {
	return t.apply(ctx, r, layer, storedAt)
}

func (t *Tree) apply(ctx context.Context, r io.Reader, layer, storedAt string) error {
	t.layers++
	m := &meter{ctx: ctx, r: r, image: &t.imageBytes, limits: t.limits}
	a := &applier{ctx: ctx, t: t, layer: t.layers, name: layer, buf: make([]byte, 1<<20), stored: -1, meter: m}
	r = m
	if storedAt != "" {
		a.stored = len(t.data)
		t.data = append(t.data, dataFile{paths: []string{storedAt}})
		a.pos = &countingReader{r: r}
		r = a.pos
	}
	err := eachEntry(ctx, r, layer, a.entry)
	if a.data != nil {
		cerr := a.dataW.Flush()
		if ccerr := a.data.Close(); cerr == nil {
			cerr = ccerr
		}
		if err == nil && cerr != nil {
			err = fmt.Errorf("data file: %w", cerr)
		}
	}
	return err
}

// Check reads a layer and runs CheckHeader and the limits that one layer
// decides on every entry, without a tree: for storing a layer whose lower
// layers are not at hand.
func Check(ctx context.Context, r io.Reader, layer string, limits Limits) error {
	var entries int64
	buf := make([]byte, 1<<20)
	return eachEntry(ctx, &meter{ctx: ctx, r: r, limits: limits}, layer, func(hdr *tar.Header, r io.Reader) error {
		if _, err := checkEntry(hdr, &entries, limits); err != nil {
			return err
		}
		for {
			if err := ctx.Err(); err != nil {
				return err
			}
			if _, err := chunk.Fill(r, buf); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
		}
	})
}

// checkEntry runs on one entry the checks that need no other entry and
// the limits that one layer decides; entries counts the layer's entries.
// It returns the entry's name components.
func checkEntry(hdr *tar.Header, entries *int64, limits Limits) ([]string, error) {
	if err := CheckHeader(hdr); err != nil {
		return nil, err
	}
	*entries++
	if err := over("entries", *entries, limits.Entries); err != nil {
		return nil, err
	}
	parts, _ := splitName(hdr.Name) // CheckHeader took it
	return parts, limits.checkHeader(hdr, len(parts))
}

// isWhiteout says whether an entry's name makes it a whiteout (or other
// aufs metadata), which removes or hides rather than adds a file.
func isWhiteout(parts []string) bool {
	return len(parts) > 0 && strings.HasPrefix(parts[len(parts)-1], whiteoutPrefix)
}

// eachEntry calls fn for every entry of a layer tar, naming the layer and
// the entry in its errors.
func eachEntry(ctx context.Context, r io.Reader, layer string, fn func(*tar.Header, io.Reader) error) error {
	tr := tar.NewReader(r)
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		var lerr *LimitError
		if errors.As(err, &lerr) && last != "" {
			// Passed while skipping what is left of the last entry.
			return &EntryError{Layer: layer, Entry: last, Err: err}
		}
		if err != nil {
			return fmt.Errorf("layer %s: reading tar: %w", layer, err)
		}
		last = hdr.Name
		if err := fn(hdr, tr); err != nil {
			var ee *EntryError
			if errors.As(err, &ee) {
				return err
			}
			return &EntryError{Layer: layer, Entry: hdr.Name, Err: err}
		}
	}
}

// splitName validates a tar entry name and returns its components; an
// empty result is the root directory itself.
func splitName(name string) ([]string, error) {
	if strings.HasPrefix(name, "/") {
		return nil, fmt.Errorf("%w: absolute path", ErrUnsafePath)
	}
	var parts []string
	for _, c := range strings.Split(name, "/") {
		switch c {
		case "", ".":
			continue
		case "..":
			return nil, fmt.Errorf("%w: path traversal (\"..\")", ErrUnsafePath)
		}
		if len(c) > maxNameLen {
			return nil, fmt.Errorf("name component is %d bytes, ext4 allows %d", len(c), maxNameLen)
		}
		if strings.IndexByte(c, 0) >= 0 {
			return nil, fmt.Errorf("name contains a NUL byte")
		}
		parts = append(parts, c)
	}
	return parts, nil
}

// CheckHeader runs the checks on an entry that need no other entry: a safe
// name, a safe hard link target, a type kiln can write. Apply runs them
// too; whoever stores layers for later can run them early, so that a bad
// layer fails when it arrives rather than when it is built.
func CheckHeader(hdr *tar.Header) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	if _, err := splitName(hdr.Name); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeLink:
		if _, err := splitName(hdr.Linkname); err != nil {
			return fmt.Errorf("hard link target %q: %w", hdr.Linkname, err)
		}
	case tar.TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) > maxLinkLen {
			return fmt.Errorf("symlink target of %d bytes", len(hdr.Linkname))
		}
	case tar.TypeChar, tar.TypeBlock:
		return checkDeviceName(hdr.Name)
	case tar.TypeDir, tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont, tar.TypeFifo:
	default:
		return fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	return nil
}

func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // pax global header (git archive writes one): not a file
	}
	parts, err := splitName(hdr.Name)
	if err != nil {
		return err
	}
	a.t.entries++
	if err := over("entries", a.t.entries, a.t.limits.Entries); err != nil {
		return err
	}
	if err := a.t.limits.checkHeader(hdr, len(parts)); err != nil {
		return err
	}
	if len(parts) == 0 {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("the root can only be a directory, not %q", hdr.Typeflag)
		}
		in, err := a.inode(hdr, TypeDir)
		if err != nil {
			return err
		}
		a.t.root.inode.replace(in)
		return nil
	}
	base := parts[len(parts)-1]
	if isWhiteout(parts) {
		return a.whiteout(parts[:len(parts)-1], base)
	}
	parent, err := a.resolveDir(parts[:len(parts)-1], true)
	if err != nil {
		return err
	}
	existing := parent.Child(base)

	switch hdr.Typeflag {
	case tar.TypeDir:
		in, err := a.inode(hdr, TypeDir)
		if err != nil {
			return err
		}
		if existing != nil && existing.inode.Type == TypeDir {
			existing.inode.replace(in)
			existing.layer = int32(a.layer)
			return nil
		}
		if err := a.remove(existing); err != nil {
			return err
		}
		n := a.attach(parent, base, in)
		return a.t.stageDir(n)

	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont:
		in, err := a.inode(hdr, TypeReg)
		if err != nil {
			return err
		}
		if err := a.remove(existing); err != nil {
			return err
		}
		n := a.attach(parent, base, in)
		return a.writeFile(a.t.StagingPath(n), n.inode, r, a.inPlace(hdr))

	case tar.TypeSymlink:
		if hdr.Linkname == "" {
			return fmt.Errorf("symlink has an empty target")
		}
		if len(hdr.Linkname) > maxLinkLen {
			return fmt.Errorf("symlink target is %d bytes, ext4 allows %d", len(hdr.Linkname), maxLinkLen)
		}
		in, err := a.inode(hdr, TypeSymlink)
		if err != nil {
			return err
		}
		in.more = &more{target: a.t.names.add(hdr.Linkname)}
		if err := a.remove(existing); err != nil {
			return err
		}
		n := a.attach(parent, base, in)
		if !a.t.staged() {
			return nil
		}
		if err := os.Symlink(hdr.Linkname, a.t.StagingPath(n)); err != nil {
			return fmt.Errorf("staging symlink: %w", err)
		}
		return nil

	case tar.TypeLink:
		target, err := a.linkTarget(hdr.Linkname)
		if err != nil {
			return err
		}
		if target == existing {
			return nil // a link to itself changes nothing
		}
		if err := a.remove(existing); err != nil {
			return err
		}
		n := a.link(parent, base, target.inode)
		if target.inode.Type.IsDevice() || !a.t.staged() {
			return nil
		}
		if err := os.Link(a.t.StagingPath(target), a.t.StagingPath(n)); err != nil {
			return fmt.Errorf("staging hard link: %w", err)
		}
		return nil

	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		typ := map[byte]Type{tar.TypeChar: TypeChar, tar.TypeBlock: TypeBlock, tar.TypeFifo: TypeFifo}[hdr.Typeflag]
		in, err := a.inode(hdr, typ)
		if err != nil {
			return err
		}
		if typ.IsDevice() {
			if err := checkDeviceName(hdr.Name); err != nil {
				return err
			}
			if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor > 0xfffff {
				return fmt.Errorf("device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
			}
			in.Major, in.Minor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
		}
		if err := a.remove(existing); err != nil {
			return err
		}
		n := a.attach(parent, base, in)
		if typ == TypeFifo && a.t.staged() {
			if err := unix.Mkfifo(a.t.StagingPath(n), 0o600); err != nil {
				return fmt.Errorf("staging fifo: %w", err)
			}
		}
		return nil
	}
	return fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
}

// checkDeviceName refuses device node names that the ext4 builder cannot
// create: it names them in a debugfs script, where a line break would end
// the command.
func checkDeviceName(name string) error {
	if strings.ContainsAny(name, "\n\r") {
		return fmt.Errorf("a device node name with a line break cannot be written to ext4 by debugfs")
	}
	return nil
}

// attach adds a new inode under parent, named name.
func (a *applier) attach(parent *Node, name string, in Inode) *Node {
	n := a.t.newNode(name, in, a.layer)
	a.add(parent, n)
	return n
}

// link adds another name for in under parent.
func (a *applier) link(parent *Node, name string, in *Inode) *Node {
	n := a.t.newLink(name, in, a.layer)
	a.add(parent, n)
	return n
}

func (a *applier) add(parent, n *Node) {
	n.parent = parent
	if in := n.inode; in.Type.IsDevice() {
		if a.t.deviceNames == nil {
			a.t.deviceNames = map[*Inode][]*Node{}
		}
		a.t.deviceNames[in] = append(a.t.deviceNames[in], n)
	}
	parent.children.add(n)
}

// replace gives a directory inode, whose only name stays, the metadata
// of another.
func (in *Inode) replace(with Inode) {
	with.id = in.id
	*in = with
}

// remove deletes a node and everything below it from the tree and the
// staging directory.
func (a *applier) remove(n *Node) error {
	if n == nil {
		return nil
	}
	var forget func(n *Node)
	forget = func(n *Node) {
		for c := range n.Children() {
			forget(c)
		}
		if in := n.inode; in.Type.IsDevice() {
			names := a.t.deviceNames[in]
			for i, m := range names {
				if m == n {
					a.t.deviceNames[in] = append(names[:i], names[i+1:]...)
					break
				}
			}
		}
	}
	forget(n)
	n.parent.children.remove(n.Name())
	if n.inode.Type == TypeDir || n.inode.Type == TypeSymlink {
		a.t.gen++ // where symlinks lead may have changed
	}
	if n.inode.Type.IsDevice() || !a.t.staged() {
		return nil
	}
	if err := os.RemoveAll(a.t.StagingPath(n)); err != nil {
		return fmt.Errorf("removing %q from staging: %w", n.Path(), err)
	}
	return nil
}

func (a *applier) whiteout(dir []string, base string) error {
	if base == opaqueMarker {
		d, err := a.resolveDir(dir, true)
		if err != nil {
			return err
		}
		return a.hideLower(d)
	}
	if strings.HasPrefix(base, whiteoutMeta) {
		return nil // other aufs metadata: not part of the filesystem
	}
	d, err := a.resolveDir(dir, false)
	if err != nil || d == nil {
		return err // nothing below a missing directory to hide
	}
	victim := d.Child(strings.TrimPrefix(base, whiteoutPrefix))
	if victim == nil || int(victim.layer) == a.layer {
		// Whiteouts only hide lower layers: an entry of this layer with
		// the same name stays.
		return nil
	}
	return a.remove(victim)
}

// hideLower removes, below an opaque directory, every name that a lower
// layer created; names of this layer stay.
func (a *applier) hideLower(d *Node) error {
	for _, c := range slices.Collect(d.Children()) {
		if int(c.layer) < a.layer {
			if err := a.remove(c); err != nil {
				return err
			}
		} else if c.inode.Type == TypeDir {
			if err := a.hideLower(c); err != nil {
				return err
			}
		}
	}
	return nil
}

// resolveDir walks a directory path from the root, following symlinks
// inside the rootfs. Missing directories are created when create is set
// (as a layer that leaves parents implicit expects); otherwise a missing
// directory yields (nil, nil).
func (a *applier) resolveDir(parts []string, create bool) (*Node, error) {
	hops := 0
	return a.walk(a.t.root, parts, false, create, &hops)
}

// walk resolves names from directory n, following symlinks. clamp says
// that ".." at the root stays at the root: the names came from an
// absolute symlink target, which is interpreted inside the rootfs like a
// chroot would. hops counts the symlinks followed so far.
func (a *applier) walk(n *Node, names []string, clamp, create bool, hops *int) (*Node, error) {
	for _, name := range names {
		a.t.walked++
		switch name {
		case "", ".":
			continue
		case "..":
			if n.parent != nil {
				n = n.parent
			} else if !clamp {
				return nil, fmt.Errorf("%w: a symlink leads outside the rootfs", ErrUnsafePath)
			}
			continue
		}
		child := n.Child(name)
		if child == nil {
			if !create {
				return nil, nil
			}
			child = a.attach(n, name, a.t.implicitDir())
			if err := a.t.stageDir(child); err != nil {
				return nil, err
			}
		}
		switch child.inode.Type {
		case TypeDir:
			n = child
		case TypeSymlink:
			next, err := a.follow(child, clamp, create, hops)
			if err != nil || next == nil {
				return nil, err
			}
			n = next
		default:
			return nil, fmt.Errorf("%q is a %s, not a directory", child.Path(), child.inode.Type)
		}
	}
	return n, nil
}

// linkKey is a symlink followed on the way to a directory, and whether
// ".." at the root was clamped where it was met.
type linkKey struct {
	link  *Node
	clamp bool
}

// resolvedLink is where a symlink led and how many symlinks that took.
type resolvedLink struct {
	dir  *Node
	hops int
}

// follow resolves a symlink met on the way to a directory. The tree
// remembers where each leads until a directory or symlink is removed:
// otherwise every entry below a long chain of symlinks, their targets
// padded with "./", resolves the whole chain again.
func (a *applier) follow(link *Node, clamp, create bool, hops *int) (*Node, error) {
	t := a.t
	if t.links == nil || t.linksGen != t.gen {
		t.links, t.linksGen = map[linkKey]resolvedLink{}, t.gen
	}
	key := linkKey{link, clamp}
	start := *hops
	r, known := t.links[key]
	if known {
		*hops += r.hops
	} else {
		*hops++
	}
	if *hops > maxSymlinks {
		return nil, fmt.Errorf("too many levels of symlinks at %q", link.Path())
	}
	if known {
		return r.dir, nil
	}
	target := link.inode.Target()
	from, abs := link.parent, strings.HasPrefix(target, "/")
	if abs {
		from = t.root
	}
	dir, err := a.walk(from, strings.Split(target, "/"), clamp || abs, create, hops)
	if err != nil || dir == nil {
		return nil, err
	}
	t.links[key] = resolvedLink{dir: dir, hops: *hops - start}
	return dir, nil
}

// linkTarget finds the node a hard link entry points to.
func (a *applier) linkTarget(linkname string) (*Node, error) {
	parts, err := splitName(linkname)
	if err != nil {
		return nil, fmt.Errorf("hard link target %q: %w", linkname, err)
	}
	if len(parts) == 0 {
		return nil, fmt.Errorf("hard link to the root directory")
	}
	dir, err := a.resolveDir(parts[:len(parts)-1], false)
	if err != nil {
		return nil, fmt.Errorf("hard link target %q: %w", linkname, err)
	}
	var target *Node
	if dir != nil {
		target = dir.Child(parts[len(parts)-1])
	}
	if target == nil {
		return nil, fmt.Errorf("hard link target %q does not exist", linkname)
	}
	if target.inode.Type == TypeDir {
		return nil, fmt.Errorf("hard link target %q is a directory", linkname)
	}
	return target, nil
}

// inode builds the metadata of an entry from its tar header.
func (a *applier) inode(hdr *tar.Header, typ Type) (Inode, error) {
	if hdr.Uid < 0 || int64(hdr.Uid) > math.MaxUint32 || hdr.Gid < 0 || int64(hdr.Gid) > math.MaxUint32 {
		return Inode{}, fmt.Errorf("owner %d:%d out of range", hdr.Uid, hdr.Gid)
	}
	xattrs, err := headerXattrs(hdr)
	if err != nil {
		return Inode{}, err
	}
	in := Inode{
		Type:   typ,
		Mode:   uint32(hdr.Mode) & 0o7777,
		UID:    uint32(hdr.Uid),
		GID:    uint32(hdr.Gid),
		Xattrs: xattrs,
	}
	atime, ctime := hdr.AccessTime, hdr.ChangeTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	if ctime.IsZero() {
		ctime = hdr.ModTime
	}
	in.setTimes(hdr.ModTime, atime, ctime)
	return in, nil
}

// headerXattrs collects extended attributes from PAX records, in both the
// SCHILY form (GNU tar, Go, BuildKit) and the LIBARCHIVE form (bsdtar).
func headerXattrs(hdr *tar.Header) (map[string]string, error) {
	var x map[string]string
	set := func(k, v string) {
		if x == nil {
			x = map[string]string{}
		}
		x[k] = v
	}
	for k, v := range hdr.PAXRecords {
		switch {
		case strings.HasPrefix(k, "SCHILY.xattr."):
			set(strings.TrimPrefix(k, "SCHILY.xattr."), v)
		case strings.HasPrefix(k, "LIBARCHIVE.xattr."):
			name, err := url.QueryUnescape(strings.TrimPrefix(k, "LIBARCHIVE.xattr."))
			if err != nil {
				return nil, fmt.Errorf("xattr record %q: %w", k, err)
			}
			val, err := base64.StdEncoding.DecodeString(v)
			if err != nil {
				return nil, fmt.Errorf("xattr record %q: %w", k, err)
			}
			set(name, string(val))
		}
	}
	for k, v := range x {
		if k == "" || strings.IndexByte(k, 0) >= 0 || len(k) > 255 {
			return nil, fmt.Errorf("invalid xattr name %q", k)
		}
		if k == "system.posix_acl_access" || k == "system.posix_acl_default" {
			if err := checkACL(v); err != nil {
				return nil, fmt.Errorf("xattr %q: %w", k, err)
			}
		}
	}
	return x, nil
}

// checkACL checks a POSIX ACL in the form tar and getxattr give it
// (version 2, entries of tag, permissions and id, 8 bytes each): ext4
// stores it in a form of its own, which only known tags convert to.
func checkACL(v string) error {
	if len(v) < 4 || binary.LittleEndian.Uint32([]byte(v)) != 2 || (len(v)-4)%8 != 0 {
		return fmt.Errorf("not a POSIX ACL (version 2)")
	}
	for p := v[4:]; len(p) > 0; p = p[8:] {
		switch tag := binary.LittleEndian.Uint16([]byte(p)); tag {
		case 0x01, 0x02, 0x04, 0x08, 0x10, 0x20: // user_obj, user, group_obj, group, mask, other
		default:
			return fmt.Errorf("POSIX ACL with unknown tag %#x", tag)
		}
	}
	return nil
}

// writeFile stages a regular file: a placeholder at path, and where its
// content is, as runs that leave out whole zero blocks so that sparse
// files stay sparse. The content is either left in place in the stored
// layer tar or written to the tree's own data file. It sets in's Size
// and Data.
//
// The placeholder holds no data but carries the size, mode (kept readable
// by its owner) and times, so that mke2fs already writes most of the
// inode right and the builder's metadata script has less to change.
func (a *applier) writeFile(path string, in *Inode, r io.Reader, inPlace bool) (err error) {
	var f *os.File
	if a.t.staged() {
		f, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return fmt.Errorf("staging file: %w", err)
		}
		defer func() {
			if cerr := f.Close(); err == nil && cerr != nil {
				err = fmt.Errorf("staging file: %w", cerr)
			}
		}()
	}
	var size int64
	var runs []Run
	switch {
	case a.replay != nil:
		// Placed when the layer was stored: the record says where.
		size, runs = a.replay.size, a.replay.runs
	case inPlace:
		// The content is read straight from the stored tar: runs point
		// there and nothing is written.
		base := a.pos.n
		p := placer{ctx: a.ctx, space: &a.t.space, meter: a.meter, buf: a.buf, file: a.stored, runs: a.runs[:0]}
		if size, runs, err = p.place(r, base); err != nil {
			return err
		}
		if a.pos.n-base != size {
			return fmt.Errorf("content is not stored contiguously in the layer tar")
		}
	default:
		if a.data == nil {
			if a.data, err = os.OpenFile(a.t.data[0].paths[0], os.O_WRONLY, 0); err != nil {
				return fmt.Errorf("data file: %w", err)
			}
			a.dataW = seqwrite.New(a.data, 1<<20)
			a.dataW.WriteBehind(writeBehind)
		}
		p := placer{ctx: a.ctx, space: &a.t.space, meter: a.meter, buf: a.buf, file: 0, w: a.dataW, runs: a.runs[:0]}
		if size, runs, err = p.place(r, 0); err != nil {
			return err
		}
	}
	for _, r := range runs {
		a.t.data[r.File].placed += r.Length
	}
	in.Size = size
	in.setData(runs)
	if a.replay == nil {
		a.runs = runs
	}
	if f == nil {
		return nil
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("staging file: %w", err)
	}
	if err := f.Chmod(os.FileMode(in.Mode&0o777|0o400) | unixModeBits(in.Mode)); err != nil {
		return fmt.Errorf("staging file: %w", err)
	}
	tv := []unix.Timeval{timeval(in.Atime()), timeval(in.Mtime())}
	if err := unix.Futimes(int(f.Fd()), tv); err != nil {
		return fmt.Errorf("staging file: %w", err)
	}
	return nil
}

// timeval converts without the overflow of UnixNano past 2262.
func timeval(t time.Time) unix.Timeval {
	return unix.Timeval{Sec: t.Unix(), Usec: int64(t.Nanosecond() / 1000)}
}

// unixModeBits turns setuid, setgid and sticky bits into os.FileMode's.
func unixModeBits(mode uint32) os.FileMode {
	var m os.FileMode
	if mode&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}

// inPlace says whether an entry's content can be read from the stored
// tar where it lies: it can unless there is no stored tar, or the entry
// is a sparse file, whose tar holds a map and the data regions only.
func (a *applier) inPlace(hdr *tar.Header) bool {
	if a.stored < 0 || hdr.Typeflag == tar.TypeGNUSparse {
		return false
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return false
		}
	}
	return true
}

// countingReader counts the bytes read through it. archive/tar reads
// exactly up to an entry's content before returning its header, so the
// count then is where the content starts in the tar.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// stageDir creates a directory node in the staging directory, if any.
func (t *Tree) stageDir(n *Node) error {
	if !t.staged() {
		return nil
	}
	if err := os.Mkdir(t.StagingPath(n), 0o700); err != nil {
		return fmt.Errorf("staging directory: %w", err)
	}
	return nil
}

// Resolve finds the node at a path, following symlinks inside the rootfs
// in every component (like the kernel would in the booted guest). It
// returns nil if nothing is there.
func (t *Tree) Resolve(path string) (*Node, error) {
	a := &applier{ctx: context.Background(), t: t}
	parts, err := splitName(strings.TrimPrefix(path, "/"))
	if err != nil {
		return nil, err
	}
	for hops := 0; ; hops++ {
		if len(parts) == 0 {
			return t.root, nil
		}
		dir, err := a.resolveDir(parts[:len(parts)-1], false)
		if err != nil || dir == nil {
			return nil, err
		}
		n := dir.Child(parts[len(parts)-1])
		if n == nil || n.inode.Type != TypeSymlink {
			return n, nil
		}
		if hops == maxSymlinks {
			return nil, fmt.Errorf("too many levels of symlinks at %q", n.Path())
		}
		target := n.inode.Target()
		if !strings.HasPrefix(target, "/") {
			target = dir.Path() + "/" + target
		}
		parts = cleanTarget(target)
	}
}

// cleanTarget resolves "." and ".." in a symlink target taken from the
// root, clamping at the root like a chroot.
func cleanTarget(target string) []string {
	var parts []string
	for _, c := range strings.Split(target, "/") {
		switch c {
		case "", ".":
		case "..":
			if len(parts) > 0 {
				parts = parts[:len(parts)-1]
			}
		default:
			parts = append(parts, c)
		}
	}
	return parts
}
