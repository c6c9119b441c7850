// Package ext4layer writes OCI image layers from ext4 filesystems read
// with ext4read, never mounting them: a whole tree (a committed
// container's disk as a base layer), an overlayfs upper directory, or the
// changes between two trees.
//
// Layers are uncompressed tars in PAX format, written as they are read:
// file contents stream from the image, nothing is buffered whole. The
// output is deterministic: entries come depth first in byte order of
// their names, a directory before what it holds. Names have no leading
// "/", directories end in "/". Headers carry mode bits (with setuid,
// setgid and sticky), numeric owners, the modification time with
// nanoseconds and extended attributes as SCHILY.xattr records; no
// access or change times. The first name of a hard-linked file carries
// its content, the others are links to it (with the same metadata, which
// appliers set from the link's header). Sockets cannot be in a tar: they
// are left out, or written as whiteouts where they hide something.
//
// Full and Changes keep every xattr, overlayfs' too: in a whole tree they
// belong to the files (a nested overlay's upper directory, say).
package ext4layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"path"
	"strings"
	"time"

	"github.com/kilnfs/kiln/internal/ext4read"
)

// Options change how layers are written.
type Options struct {
	// SourceDateEpoch, when set, replaces modification times later than
	// it, as containerd does for reproducible layers.
	SourceDateEpoch *time.Time
	// SharedBlocks tells Changes that upper started as a block-for-block
	// copy of lower (a clone of its disk). A regular file whose metadata
	// is unchanged and whose blocks sit at the same places in both is
	// then taken as unchanged without comparing bytes, as containerd
	// takes files with unchanged metadata. A file rewritten in place
	// with its modification time put back would be missed. Without it,
	// such files are compared byte by byte.
	SharedBlocks bool
	// Exclude lists paths (absolute, such as "/.kiln") that the layer
	// leaves out, with everything below them, on both sides of Changes.
	Exclude []string
}

// OCI whiteouts (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// Full writes the tree at directory root of fsys as a layer that holds
// all of it, the root itself as "./".
func Full(ctx context.Context, w io.Writer, fsys *ext4read.FS, root uint32, opts Options) error {
	lw := newWriter(ctx, w, nil, fsys, opts)
	return lw.run(root, 0)
}

// OverlayUpper writes the overlayfs upper directory at upperDir (a path
// in fsys, such as "/upper") as a layer, converted as containerd's
// overlay differ does: a 0:0 character device is a whiteout, a directory
// with trusted.overlay.opaque or user.overlay.opaque "y" gets an opaque
// marker, overlayfs' own xattrs (trusted.overlay.*, user.overlay.*) are
// dropped and escaped ones (trusted.overlay.overlay.*) unescaped. Paths
// are relative to upperDir. Redirected directories and metacopy files,
// which overlayfs makes only when those features are turned on, are
// refused.
func OverlayUpper(ctx context.Context, w io.Writer, fsys *ext4read.FS, upperDir string, opts Options) error {
	root, err := fsys.Lookup(upperDir)
	if errors.Is(err, fs.ErrNotExist) {
		// Never mounted: nothing changed.
		return tar.NewWriter(w).Close()
	}
	if err != nil {
		return fmt.Errorf("overlay upper directory: %w", err)
	}
	lw := newWriter(ctx, w, nil, fsys, opts)
	lw.overlay = true
	return lw.run(root, 0)
}

// Changes writes the differences from lower to upper, two whole trees, as
// a layer: entries that are new or changed in upper in full, entries gone
// from lower as whiteouts (one for a whole directory). A directory that
// became something else is whited out before its replacement is written.
// The directories above a changed entry are written first, with upper's
// metadata, even when they did not change; the root only when it
// changed. A nil lower is an empty tree: then the layer holds all of
// upper.
//
// An entry is unchanged when its type, mode, owner, modification time,
// xattrs, symlink target or device numbers are the same and, for a
// regular file, its size and content (see Options.SharedBlocks).
func Changes(ctx context.Context, w io.Writer, lower, upper *ext4read.FS, opts Options) error {
	lw := newWriter(ctx, w, lower, upper, opts)
	var lowerRoot uint32
	if lower != nil {
		lowerRoot = lower.Root()
	}
	return lw.run(upper.Root(), lowerRoot)
}

// writer walks upper, and lower beside it when there is one.
type writer struct {
	ctx          context.Context
	tw           *tar.Writer
	opts         Options
	lower, upper *ext4read.FS
	lw, uw       *ext4read.Walker
	overlay      bool

	// dirs are upper's directories met so far, by path: their inode and
	// whether their header is written.
	dirs map[string]*dirState
	// links maps a hard-linked inode of upper to the name that carries
	// its content; pending holds its unchanged names met before that
	// name was written, which must then link to it.
	links   map[uint32]string
	pending map[uint32][]string
	cmp     [2][]byte // buffers for copying and comparing contents
}

// chunk is how much content is read at a time, and how often a long copy
// or comparison checks for cancellation.
const chunk = 1 << 20

type dirState struct {
	ino     uint32
	written bool
}

func newWriter(ctx context.Context, w io.Writer, lower, upper *ext4read.FS, opts Options) *writer {
	lw := &writer{
		ctx: ctx, tw: tar.NewWriter(w), opts: opts, lower: lower, upper: upper,
		uw: upper.NewWalker(), dirs: map[string]*dirState{},
		links: map[uint32]string{}, pending: map[uint32][]string{},
	}
	if lower != nil {
		lw.lw = lower.NewWalker()
	}
	return lw
}

// file is one name with its inode and xattrs, in upper or lower.
type file struct {
	in *ext4read.Inode
	x  map[string][]byte
}

func (w *writer) run(upperRoot, lowerRoot uint32) error {
	u, err := w.read(w.upper, upperRoot)
	if err != nil {
		return fmt.Errorf("/: %w", err)
	}
	if u.in.Type != ext4read.TypeDir {
		return fmt.Errorf("/: the root is a %s, not a directory", u.in.Type)
	}
	var l *file
	if w.lower != nil {
		if l, err = w.read(w.lower, lowerRoot); err != nil {
			return fmt.Errorf("/: lower: %w", err)
		}
		if l.in.Type != ext4read.TypeDir {
			return fmt.Errorf("/: lower: the root is a %s, not a directory", l.in.Type)
		}
	}
	opaque, err := w.overlayXattrs(u)
	if err != nil {
		return fmt.Errorf("/: %w", err)
	}
	state := &dirState{ino: upperRoot}
	w.dirs[""] = state
	if l == nil || !w.same(l, u) {
		if err := w.writeHeader("", u); err != nil {
			return err
		}
		state.written = true
	}
	if opaque {
		if err := w.whiteout(opaqueMarker, ""); err != nil {
			return err
		}
	}
	if err := w.dir("", u.in, l, 0); err != nil {
		return err
	}
	if err := w.tw.Close(); err != nil {
		return fmt.Errorf("finishing the layer: %w", err)
	}
	return nil
}

func (w *writer) read(fsys *ext4read.FS, ino uint32) (*file, error) {
	in, err := fsys.Inode(ino)
	if err != nil {
		return nil, err
	}
	x, err := fsys.Xattrs(ino)
	if err != nil {
		return nil, err
	}
	return &file{in, x}, nil
}

// dir merges upper directory p with its lower counterpart l (nil: all
// of upper's entries are new).
func (w *writer) dir(p string, u *ext4read.Inode, l *file, depth int) error {
	uents, err := w.uw.ReadDir(u, depth)
	if err != nil {
		return fmt.Errorf("%s: %w", display(p), err)
	}
	var lents []ext4read.DirEntry
	if l != nil {
		if lents, err = w.lw.ReadDir(l.in, depth); err != nil {
			return fmt.Errorf("%s: lower: %w", display(p), err)
		}
	}
	uents, lents = w.keep(p, uents), w.keep(p, lents)
	for i, j := 0, 0; i < len(lents) || j < len(uents); {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		switch {
		case j == len(uents) || (i < len(lents) && lents[i].Name < uents[j].Name):
			if err := w.whiteout(whiteoutPrefix+lents[i].Name, p); err != nil {
				return err
			}
			i++
		case i == len(lents) || uents[j].Name < lents[i].Name:
			if err := w.entry(join(p, uents[j].Name), uents[j].Ino, 0, depth+1); err != nil {
				return err
			}
			j++
		default:
			if err := w.entry(join(p, uents[j].Name), uents[j].Ino, lents[i].Ino, depth+1); err != nil {
				return err
			}
			i, j = i+1, j+1
		}
	}
	return nil
}

// keep drops the entries of directory p that Options.Exclude names.
func (w *writer) keep(p string, ents []ext4read.DirEntry) []ext4read.DirEntry {
	if len(w.opts.Exclude) == 0 {
		return ents
	}
	out := ents[:0:0]
	for _, e := range ents {
		if !w.excluded(join(p, e.Name)) {
			out = append(out, e)
		}
	}
	return out
}

func (w *writer) excluded(p string) bool {
	for _, x := range w.opts.Exclude {
		x = strings.Trim(path.Clean("/"+x), "/")
		if p == x || strings.HasPrefix(p, x+"/") {
			return true
		}
	}
	return false
}

// entry handles name p: upper's inode uino, lower's lino (0 if lower has
// no such name).
func (w *writer) entry(p string, uino, lino uint32, depth int) error {
	u, err := w.read(w.upper, uino)
	if err != nil {
		return fmt.Errorf("%s: %w", display(p), err)
	}
	var l *file
	if lino != 0 {
		if l, err = w.read(w.lower, lino); err != nil {
			return fmt.Errorf("%s: lower: %w", display(p), err)
		}
	}
	dir, base := path.Split(p)
	dir = strings.TrimSuffix(dir, "/")
	if w.overlay && u.in.Type == ext4read.TypeCharDev && u.in.Major == 0 && u.in.Minor == 0 {
		return w.whiteout(whiteoutPrefix+base, dir)
	}
	opaque, err := w.overlayXattrs(u)
	if err != nil {
		return fmt.Errorf("%s: %w", display(p), err)
	}
	if u.in.Type == ext4read.TypeSocket {
		// A tar cannot hold it; it still hides what was there.
		if l != nil || w.overlay {
			return w.whiteout(whiteoutPrefix+base, dir)
		}
		return nil
	}
	if l != nil && (l.in.Type == ext4read.TypeDir) != (u.in.Type == ext4read.TypeDir) {
		if l.in.Type == ext4read.TypeDir {
			if err := w.whiteout(whiteoutPrefix+base, dir); err != nil {
				return err
			}
		}
		l = nil // a new entry, and a new tree below it
	}
	if l == nil || !w.same(l, u) {
		if err := w.write(p, u); err != nil {
			return err
		}
	} else if u.in.Type != ext4read.TypeDir && u.in.Links > 1 {
		if err := w.unchangedLink(p, u); err != nil {
			return err
		}
	}
	if u.in.Type != ext4read.TypeDir {
		return nil
	}
	if _, ok := w.dirs[p]; !ok {
		w.dirs[p] = &dirState{ino: uino}
	}
	if opaque {
		if err := w.whiteout(opaqueMarker, p); err != nil {
			return err
		}
	}
	return w.dir(p, u.in, l, depth)
}

// same reports whether upper's u is unchanged from lower's l.
func (w *writer) same(l, u *file) bool {
	a, b := l.in, u.in
	if a.Type != b.Type || a.Mode != b.Mode || a.UID != b.UID || a.GID != b.GID ||
		!a.Mtime.Equal(b.Mtime) || !maps.EqualFunc(l.x, u.x, bytes.Equal) {
		return false
	}
	switch b.Type {
	case ext4read.TypeCharDev, ext4read.TypeBlockDev:
		return a.Major == b.Major && a.Minor == b.Minor
	case ext4read.TypeSymlink:
		lt, lerr := w.lower.Readlink(a.Ino)
		ut, uerr := w.upper.Readlink(b.Ino)
		// An unreadable target counts as changed; writing the entry
		// then reports the error.
		return lerr == nil && uerr == nil && lt == ut
	case ext4read.TypeRegular:
		return a.Size == b.Size && w.sameContent(a.Ino, b.Ino)
	}
	return true
}

// sameContent compares two regular files of the same size; any error
// counts as a difference, which writing the file then reports.
func (w *writer) sameContent(lino, uino uint32) bool {
	lf, err := w.lower.Open(lino)
	if err != nil {
		return false
	}
	uf, err := w.upper.Open(uino)
	if err != nil {
		return false
	}
	if w.opts.SharedBlocks {
		if same, err := lf.SameBlocks(uf); err == nil && same {
			return true
		}
	}
	if w.cmp[0] == nil {
		w.cmp = [2][]byte{make([]byte, chunk), make([]byte, chunk)}
	}
	a, b := w.cmp[0], w.cmp[1]
	for off := int64(0); off < uf.Size(); off += chunk {
		if w.ctx.Err() != nil {
			return false
		}
		n := int(min(chunk, uf.Size()-off))
		if _, err := lf.ReadAt(a[:n], off); err != nil && err != io.EOF {
			return false
		}
		if _, err := uf.ReadAt(b[:n], off); err != nil && err != io.EOF {
			return false
		}
		if !bytes.Equal(a[:n], b[:n]) {
			return false
		}
	}
	return true
}

// overlayXattrs drops overlayfs' private xattrs from u (in an overlay
// upper directory) and reports whether it marks an opaque directory.
func (w *writer) overlayXattrs(u *file) (opaque bool, err error) {
	if !w.overlay {
		return false, nil
	}
	x := map[string][]byte{}
	for k, v := range u.x {
		prefix, rest, private := overlayPrivate(k)
		switch {
		case !private:
			x[k] = v
		case strings.HasPrefix(rest, "overlay."):
			// An escaped xattr: the file's own, named like overlayfs'.
			x[prefix+strings.TrimPrefix(rest, "overlay.")] = v
		case rest == "redirect" || rest == "metacopy":
			return false, fmt.Errorf("overlayfs %s (%s) is not supported", rest, k)
		case rest == "opaque" && string(v) == "y" && u.in.Type == ext4read.TypeDir:
			opaque = true
		}
	}
	u.x = x
	return opaque, nil
}

// overlayPrivate splits an overlayfs xattr name into its namespace
// prefix and the rest.
func overlayPrivate(name string) (prefix, rest string, ok bool) {
	for _, p := range []string{"trusted.overlay.", "user.overlay."} {
		if strings.HasPrefix(name, p) {
			return p, name[len(p):], true
		}
	}
	return "", "", false
}

// write writes the entry for p, after the directories above it.
func (w *writer) write(p string, f *file) error {
	if err := w.parents(p); err != nil {
		return err
	}
	in := f.in
	if in.Type != ext4read.TypeDir && in.Links > 1 {
		if first, ok := w.links[in.Ino]; ok {
			return w.link(p, first, f)
		}
	}
	if err := w.writeHeader(p, f); err != nil {
		return err
	}
	if in.Type == ext4read.TypeDir {
		if d, ok := w.dirs[p]; ok {
			d.written = true
		} else {
			w.dirs[p] = &dirState{ino: in.Ino, written: true}
		}
		return nil
	}
	if in.Links > 1 {
		w.links[in.Ino] = p
		for _, other := range w.pending[in.Ino] {
			if err := w.parents(other); err != nil {
				return err
			}
			if err := w.link(other, p, f); err != nil {
				return err
			}
		}
		delete(w.pending, in.Ino)
	}
	return nil
}

// unchangedLink handles an unchanged name of a hard-linked file: if the
// file is (or will be) in the layer under another name, this name must
// link to it there, or applying the layer would split them.
func (w *writer) unchangedLink(p string, u *file) error {
	if first, ok := w.links[u.in.Ino]; ok {
		if err := w.parents(p); err != nil {
			return err
		}
		return w.link(p, first, u)
	}
	w.pending[u.in.Ino] = append(w.pending[u.in.Ino], p)
	return nil
}

// parents writes the directories above p that are not written yet (but
// never the root), outermost first.
func (w *writer) parents(p string) error {
	dir := path.Dir(p)
	if dir == "." || dir == "/" {
		return nil
	}
	d, ok := w.dirs[dir]
	if !ok {
		return fmt.Errorf("%s: directory not walked yet", display(dir))
	}
	if d.written {
		return nil
	}
	if err := w.parents(dir); err != nil {
		return err
	}
	f, err := w.read(w.upper, d.ino)
	if err != nil {
		return fmt.Errorf("%s: %w", display(dir), err)
	}
	if err := w.writeHeader(dir, f); err != nil {
		return err
	}
	d.written = true
	return nil
}

// header returns the header fields p and f have whatever their type.
func (w *writer) header(p string, f *file) *tar.Header {
	hdr := &tar.Header{
		Name:    p,
		Mode:    int64(f.in.Mode),
		Uid:     int(f.in.UID),
		Gid:     int(f.in.GID),
		ModTime: w.clamp(f.in.Mtime),
		Format:  tar.FormatPAX,
	}
	if len(f.x) > 0 {
		hdr.PAXRecords = make(map[string]string, len(f.x))
		for k, v := range f.x {
			hdr.PAXRecords["SCHILY.xattr."+k] = string(v)
		}
	}
	return hdr
}

// writeHeader writes p's header, and its content for a regular file.
func (w *writer) writeHeader(p string, f *file) error {
	in := f.in
	hdr := w.header(p, f)
	switch in.Type {
	case ext4read.TypeDir:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
		if p == "" {
			hdr.Name = "./"
		}
	case ext4read.TypeRegular:
		hdr.Typeflag, hdr.Size = tar.TypeReg, in.Size
	case ext4read.TypeSymlink:
		target, err := w.upper.Readlink(in.Ino)
		if err != nil {
			return fmt.Errorf("%s: %w", display(p), err)
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	case ext4read.TypeCharDev, ext4read.TypeBlockDev:
		hdr.Typeflag = tar.TypeChar
		if in.Type == ext4read.TypeBlockDev {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor, hdr.Devminor = int64(in.Major), int64(in.Minor)
	case ext4read.TypeFifo:
		hdr.Typeflag = tar.TypeFifo
	default:
		return fmt.Errorf("%s: a %s cannot be written to a layer", display(p), in.Type)
	}
	if err := w.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: writing the header: %w", display(p), err)
	}
	if hdr.Typeflag == tar.TypeReg && hdr.Size > 0 {
		if err := w.copyContent(in.Ino, hdr.Size); err != nil {
			return fmt.Errorf("%s: %w", display(p), err)
		}
	}
	return nil
}

func (w *writer) copyContent(ino uint32, size int64) error {
	f, err := w.upper.Open(ino)
	if err != nil {
		return err
	}
	if w.cmp[0] == nil {
		w.cmp = [2][]byte{make([]byte, chunk), make([]byte, chunk)}
	}
	buf := w.cmp[0]
	for off := int64(0); off < size; {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		n, err := f.ReadAt(buf[:min(chunk, size-off)], off)
		if n > 0 {
			if _, werr := w.tw.Write(buf[:n]); werr != nil {
				return fmt.Errorf("writing the content: %w", werr)
			}
			off += int64(n)
		}
		if err != nil && !(errors.Is(err, io.EOF) && off == size) {
			return fmt.Errorf("reading the content: %w", err)
		}
	}
	return nil
}

// link writes p as a hard link to target, another name of f. The header
// carries f's metadata as well: appliers (containerd's, Docker's) set the
// owner, mode and times of a link from its own header.
func (w *writer) link(p, target string, f *file) error {
	hdr := w.header(p, f)
	hdr.Typeflag, hdr.Linkname = tar.TypeLink, target
	if err := w.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: writing the header: %w", display(p), err)
	}
	return nil
}

// whiteout writes the whiteout or marker name in directory dir. Like
// containerd's since 2.0, it carries the Unix epoch as its time.
func (w *writer) whiteout(name, dir string) error {
	p := join(dir, name)
	if err := w.parents(p); err != nil {
		return err
	}
	if err := w.tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeReg, Name: p, ModTime: time.Unix(0, 0), Format: tar.FormatPAX,
	}); err != nil {
		return fmt.Errorf("%s: writing the header: %w", display(p), err)
	}
	return nil
}

func (w *writer) clamp(t time.Time) time.Time {
	if e := w.opts.SourceDateEpoch; e != nil && t.After(*e) {
		return *e
	}
	return t
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// display names p for errors, from the root of the layer.
func display(p string) string { return "/" + p }
