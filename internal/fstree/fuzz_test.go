package fstree_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/fstree/fstreetest"
)

// FuzzApply replays one to four layers drawn from the input (see
// fstreetest), each copied, stored as a tar or stored as a record (see
// fstree.StoreLayer) as the bits of stored say, into a
// tree and into a model of OCI layer semantics kept by path, and checks
// that the two fail at the same entry or not at all, that they hold the
// same entries with the same metadata, content and hard links, and that
// the tree is sound (see fstreetest.Check).
func FuzzApply(f *testing.F) {
	for i, seed := range fstreetest.Seeds() {
		f.Add(seed, uint8(i))
		f.Add(seed, uint8(i)<<4|0x0f^uint8(i))
	}
	f.Fuzz(func(t *testing.T, data []byte, stored uint8) {
		dir := t.TempDir()
		tr, err := fstree.New("", dir+"/data", time.Unix(0, 0))
		if err != nil {
			t.Fatal(err)
		}
		m := newModel(tr.Epoch())
		for i, l := range fstreetest.Layers(data) {
			name := fmt.Sprintf("layer%d", i)
			storedIn := ""
			if stored>>i&1 == 1 {
				storedIn = dir
			}
			var err error
			if stored>>(i+4)&1 == 1 {
				within(t, time.Minute, "storing "+name, func() { err = l.Store(tr, name, dir, fstree.Limits{}) })
			} else {
				within(t, time.Minute, "applying "+name, func() { err = l.Apply(tr, name, storedIn) })
			}
			bad, merr := m.apply(l.Tar())
			if (err != nil) != (merr != nil) {
				t.Fatalf("%s: tree says %v, the model %v", name, err, merr)
			}
			if err != nil {
				var ee *fstree.EntryError
				if !errors.As(err, &ee) || ee.Layer != name || ee.Entry != bad {
					t.Fatalf("%s: error %v, want one naming the layer and entry %q (%v)", name, err, bad, merr)
				}
				break // as a build stops
			}
		}
		if err := fstreetest.Check(tr); err != nil {
			t.Fatal(err)
		}
		m.compare(t, tr)
	})
}

// within runs fn, failing the test if it does not return in d: a layer
// that makes kiln loop is as bad as one that makes it crash.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not end in %v", what, d)
	}
}

// model is what a tree must hold, kept by path: the same semantics as
// Apply, written without nodes, caches or staging.
type model struct {
	nodes map[string]*modelNode // by path, "" for the root
	layer int
	epoch time.Time
}

type modelNode struct {
	in    *modelInode // shared by hard links
	layer int         // that created the name
}

type modelInode struct {
	typ                 fstree.Type
	mode, uid, gid      uint32
	mtime, atime, ctime time.Time
	xattrs              map[string]string
	major, minor        uint32
	target              string
	content             []byte
}

func newModel(epoch time.Time) *model {
	m := &model{nodes: map[string]*modelNode{}, epoch: epoch}
	m.nodes[""] = &modelNode{in: m.implicitDir()}
	return m
}

func (m *model) implicitDir() *modelInode {
	return &modelInode{typ: fstree.TypeDir, mode: 0o755, mtime: m.epoch, atime: m.epoch, ctime: m.epoch}
}

// apply replays a layer; on an error it returns the entry's name.
func (m *model) apply(tarball []byte) (string, error) {
	m.layer++
	tr := tar.NewReader(bytes.NewReader(tarball))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return "", nil
		}
		if err != nil {
			return "", err
		}
		content, err := io.ReadAll(tr)
		if err != nil {
			return hdr.Name, err
		}
		if err := m.entry(hdr, content); err != nil {
			return hdr.Name, err
		}
	}
}

var errModel = errors.New("refused")

func (m *model) entry(hdr *tar.Header, content []byte) error {
	if strings.HasPrefix(hdr.Name, "/") || slices.Contains(strings.Split(hdr.Name, "/"), "..") {
		return fmt.Errorf("%w: unsafe name", errModel)
	}
	name := path.Clean("/" + hdr.Name)[1:]
	in := &modelInode{
		mode: uint32(hdr.Mode) & 0o7777, uid: uint32(hdr.Uid), gid: uint32(hdr.Gid),
		mtime: hdr.ModTime, atime: hdr.AccessTime, ctime: hdr.ChangeTime,
		content: content,
	}
	if hdr.Typeflag == tar.TypeSymlink {
		in.target = hdr.Linkname
	}
	if in.atime.IsZero() { // a tar without them
		in.atime = in.mtime
	}
	if in.ctime.IsZero() {
		in.ctime = in.mtime
	}
	var badACL error // a layer may only hold ACLs ext4 can
	for k, v := range hdr.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if in.xattrs == nil {
				in.xattrs = map[string]string{}
			}
			in.xattrs[x] = v
			if strings.HasPrefix(x, "system.posix_acl_") && !validACL(v) {
				badACL = fmt.Errorf("%w: ACL", errModel)
			}
		}
	}
	typ := map[byte]fstree.Type{tar.TypeDir: fstree.TypeDir, tar.TypeReg: fstree.TypeReg, tar.TypeSymlink: fstree.TypeSymlink,
		tar.TypeChar: fstree.TypeChar, tar.TypeBlock: fstree.TypeBlock, tar.TypeFifo: fstree.TypeFifo}[hdr.Typeflag]
	in.typ = typ
	if name == "" {
		if typ != fstree.TypeDir {
			return fmt.Errorf("%w: the root as a %s", errModel, typ)
		}
		if badACL != nil {
			return badACL
		}
		m.nodes[""].in = in
		return nil
	}
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if strings.HasPrefix(base, ".wh.") {
		return m.whiteout(dir, base)
	}
	parent, err := m.resolve(dir, true)
	if err != nil {
		return err
	}
	if badACL != nil && hdr.Typeflag != tar.TypeLink {
		return badACL // a hard link has no metadata of its own
	}
	at := join(parent, base)
	existing := m.nodes[at]
	switch hdr.Typeflag {
	case tar.TypeDir:
		if existing != nil && existing.in.typ == fstree.TypeDir {
			existing.in, existing.layer = in, m.layer
			return nil
		}
	case tar.TypeSymlink:
		if hdr.Linkname == "" {
			return fmt.Errorf("%w: empty symlink target", errModel)
		}
	case tar.TypeLink:
		target, err := m.linkTarget(hdr.Linkname)
		if err != nil {
			return err
		}
		if target == at {
			return nil
		}
		in = m.nodes[target].in
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Devmajor > 0xfff || hdr.Devminor > 0xfffff {
			return fmt.Errorf("%w: device number", errModel)
		}
		in.major, in.minor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	}
	m.remove(at)
	m.nodes[at] = &modelNode{in: in, layer: m.layer}
	return nil
}

// validACL says whether v is an ACL as tar holds it: version 2, then
// entries of a known tag (16 bits), permissions (16) and an id (32).
func validACL(v string) bool {
	b := []byte(v)
	if len(b) < 4 || b[0] != 2 || b[1] != 0 || b[2] != 0 || b[3] != 0 || (len(b)-4)%8 != 0 {
		return false
	}
	for b = b[4:]; len(b) > 0; b = b[8:] {
		if b[1] != 0 || !slices.Contains([]byte{1, 2, 4, 8, 16, 32}, b[0]) {
			return false
		}
	}
	return true
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func parentOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// remove deletes a name and everything below it.
func (m *model) remove(p string) {
	if m.nodes[p] == nil {
		return
	}
	for q := range m.nodes {
		if q == p || strings.HasPrefix(q, p+"/") {
			delete(m.nodes, q)
		}
	}
}

func (m *model) children(dir string) []string {
	var c []string
	for q := range m.nodes {
		if q != "" && parentOf(q) == dir {
			c = append(c, q)
		}
	}
	slices.Sort(c)
	return c
}

func (m *model) whiteout(dir, base string) error {
	if base == ".wh..wh..opq" {
		d, err := m.resolve(dir, true)
		if err != nil {
			return err
		}
		m.hideLower(d)
		return nil
	}
	if strings.HasPrefix(base, ".wh..wh.") {
		return nil
	}
	d, err := m.resolve(dir, false)
	if err != nil || d == "\x00" {
		return err
	}
	victim := join(d, strings.TrimPrefix(base, ".wh."))
	if n := m.nodes[victim]; n != nil && n.layer < m.layer {
		m.remove(victim)
	}
	return nil
}

func (m *model) hideLower(dir string) {
	for _, c := range m.children(dir) {
		if n := m.nodes[c]; n == nil {
			continue
		} else if n.layer < m.layer {
			m.remove(c)
		} else if n.in.typ == fstree.TypeDir {
			m.hideLower(c)
		}
	}
}

func (m *model) linkTarget(linkname string) (string, error) {
	if strings.HasPrefix(linkname, "/") || slices.Contains(strings.Split(linkname, "/"), "..") {
		return "", fmt.Errorf("%w: unsafe link target", errModel)
	}
	name := path.Clean("/" + linkname)[1:]
	if name == "" {
		return "", fmt.Errorf("%w: link to the root", errModel)
	}
	dir, base := path.Split(name)
	d, err := m.resolve(strings.TrimSuffix(dir, "/"), false)
	if err != nil {
		return "", err
	}
	target := join(d, base)
	if n := m.nodes[target]; d == "\x00" || n == nil || n.in.typ == fstree.TypeDir {
		return "", fmt.Errorf("%w: no link target", errModel)
	}
	return target, nil
}

// resolve finds the directory at a clean path from the root, following
// symlinks like the kernel in a chroot but failing for ".." past the
// root in relative targets (as an escape would be), creating what is
// missing if create is set. "\x00" is a missing directory.
func (m *model) resolve(dir string, create bool) (string, error) {
	hops := 0
	if dir == "" {
		return "", nil
	}
	return m.walk("", strings.Split(dir, "/"), false, create, &hops)
}

func (m *model) walk(dir string, names []string, clamp, create bool, hops *int) (string, error) {
	for _, name := range names {
		switch name {
		case "", ".":
			continue
		case "..":
			if dir == "" && !clamp {
				return "", fmt.Errorf("%w: escape", errModel)
			}
			dir = parentOf(dir)
			continue
		}
		p := join(dir, name)
		n := m.nodes[p]
		if n == nil {
			if !create {
				return "\x00", nil
			}
			n = &modelNode{in: m.implicitDir(), layer: m.layer}
			m.nodes[p] = n
		}
		switch n.in.typ {
		case fstree.TypeDir:
			dir = p
		case fstree.TypeSymlink:
			if *hops++; *hops > 40 { // the kernel's MAXSYMLINKS
				return "", fmt.Errorf("%w: symlink loop", errModel)
			}
			from, abs := dir, strings.HasPrefix(n.in.target, "/")
			if abs {
				from = ""
			}
			d, err := m.walk(from, strings.Split(n.in.target, "/"), clamp || abs, create, hops)
			if err != nil || d == "\x00" {
				return d, err
			}
			dir = d
		default:
			return "", fmt.Errorf("%w: not a directory", errModel)
		}
	}
	return dir, nil
}

// compare checks that the tree holds what the model says.
func (m *model) compare(t *testing.T, tr *fstree.Tree) {
	t.Helper()
	inodes := map[*fstree.Inode]*modelInode{}
	back := map[*modelInode]*fstree.Inode{}
	seen := 0
	err := tr.Walk(func(n *fstree.Node) error {
		p := n.Path()
		in := n.Inode()
		want := m.nodes[p]
		if want == nil {
			return fmt.Errorf("%q is in the tree, not in the model", p)
		}
		seen++
		if w, ok := inodes[in]; ok && w != want.in {
			return fmt.Errorf("%q shares an inode the model does not", p)
		}
		if b, ok := back[want.in]; ok && b != in {
			return fmt.Errorf("%q has an inode of its own, the model a hard link", p)
		}
		inodes[in], back[want.in] = want.in, in
		w := want.in
		got := &modelInode{typ: in.Type, mode: in.Mode, uid: in.UID, gid: in.GID, mtime: in.Mtime(), atime: in.Atime(), ctime: in.Ctime(),
			xattrs: in.Xattrs, major: in.Major, minor: in.Minor, target: in.Target()}
		if in.Type == fstree.TypeReg {
			var err error
			if got.content, err = fstreetest.Content(tr, in); err != nil {
				return fmt.Errorf("%q: %w", p, err)
			}
		}
		if got.typ != w.typ || got.mode != w.mode || got.uid != w.uid || got.gid != w.gid || !got.mtime.Equal(w.mtime) ||
			!got.atime.Equal(w.atime) || !got.ctime.Equal(w.ctime) || !maps.Equal(got.xattrs, w.xattrs) ||
			got.major != w.major || got.minor != w.minor || got.target != w.target || !bytes.Equal(got.content, w.content) {
			return fmt.Errorf("%q:\n tree  %s\n model %s", p, got, w)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(m.nodes) {
		for p := range m.nodes {
			if tr.Lookup(p) == nil {
				t.Fatalf("%q is in the model, not in the tree", p)
			}
		}
	}
}

func (in *modelInode) String() string {
	return fmt.Sprintf("%s %o %d:%d times %v %v %v xattrs %q device %d:%d target %q content %q",
		in.typ, in.mode, in.uid, in.gid, in.mtime, in.atime, in.ctime, in.xattrs, in.major, in.minor, in.target, in.content)
}
