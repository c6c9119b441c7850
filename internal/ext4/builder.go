// Package ext4 turns a merged root filesystem into an ext4 image with
// e2fsprogs, without mounting anything and without privileges.
//
// mke2fs -d lays out the staging directory (names, hard links, symlinks,
// fifos and placeholders for regular files); a first debugfs script
// creates the device nodes and allocates every file's blocks, kiln copies
// the contents into those blocks (see data.go), and a second script
// restores what an unprivileged writer could not stage: ownership, modes,
// exact timestamps and extended attributes. That script compares every
// field with what mke2fs wrote and sets each one that differs, so the bytes
// do not depend on who ran the build. Last, e2fsck indexes the directories
// and tune2fs turns on metadata checksums (see finish).
package ext4

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kilnfs/kiln/internal/fstree"
)

// BlockSize is the filesystem block size kiln builds with.
const BlockSize = 4096

// Options control how a tree becomes an image.
type Options struct {
	// Size is the filesystem size in bytes; 0 sizes it from the content
	// with headroom (see AutoSize).
	Size int64
	// Identity seeds the filesystem UUID and directory hash seed. Give it
	// everything that determines the content (the image's chain ID and
	// the build options) so that equal inputs give equal bytes.
	Identity string
	// WorkDir holds the build's temporary files.
	WorkDir string
	// NoSync leaves the file contents in the page cache instead of
	// waiting for the disk; the caller syncs the image file before
	// relying on it after a crash.
	NoSync bool
	// Take names one of the tree's data files (fstree.Tree.DataFiles)
	// that a writer may turn into the image, renamed to out, so that the
	// contents already where the image wants them are not copied again.
	// Those contents stay where they were in the file. "" for none.
	Take string
	// TakeKeeps says that others still read the contents of the file to
	// take: it is taken only if the image holds all of them (what the
	// image does not hold would be freed in the file).
	TakeKeeps bool
}

// Result describes a built image.
type Result struct {
	Size   int64  // filesystem size in bytes
	Inodes int64  // inodes used by the content
	UUID   string // filesystem UUID
}

// ErrNoSpace is wrapped when the content does not fit the requested size.
var ErrNoSpace = errors.New("rootfs does not fit in the filesystem")

// mke2fsConfig pins everything mke2fs would otherwise take from the host's
// /etc/mke2fs.conf, so that any machine with the same e2fsprogs produces
// the same bytes. The feature set is what e2fsprogs 1.46 (common in
// guests) and kernels since 4.x accept: no orphan_file, no
// metadata_csum_seed, no inline_data or large_dir. metadata_csum is
// missing here only because it is turned on at the end (see finish);
// until then uninit_bg stands in for it, so that groups without content
// stay uninitialised and the last steps skip them.
const mke2fsConfig = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 0

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,uninit_bg,64bit,dir_nlink,extra_isize
	}
`

// E2fsprogs is Build as a build.Writer: the reference writer, which
// reads the tree's names from its staging directory.
type E2fsprogs struct{}

func (E2fsprogs) Name() string { return "e2fsprogs" }
func (E2fsprogs) Staged() bool { return true }
func (E2fsprogs) Write(ctx context.Context, tree *fstree.Tree, out string, opts Options) (Result, error) {
	return Build(ctx, tree, out, opts)
}

// Build writes the tree as an ext4 image to out, which must not exist.
func Build(ctx context.Context, tree *fstree.Tree, out string, opts Options) (Result, error) {
	if opts.WorkDir == "" {
		return Result{}, errors.New("ext4: no work directory")
	}
	stats := tree.Stats()
	size, inodes := opts.Size, InodeCount(stats, opts.Size)
	if size == 0 {
		size = AutoSize(stats)
		inodes = InodeCount(stats, size)
	}
	size = size / BlockSize * BlockSize
	b := &builder{tree: tree, out: out, size: size, opts: opts}
	b.uuid = DeriveUUID("kiln.fs-uuid", opts.Identity)
	b.env = b.environ()
	meta, err := os.CreateTemp(opts.WorkDir, "meta-*.ext4")
	if err != nil {
		return Result{}, err
	}
	b.meta = meta.Name()
	defer os.Remove(b.meta)
	if err := meta.Close(); err != nil {
		return Result{}, err
	}

	noSpace := func(err error) error {
		if errors.Is(err, ErrNoSpace) {
			need := (stats.DataBlocks + stats.LongSymlinks + stats.XattrBlocks + dirBlocks(stats)) * BlockSize
			err = fmt.Errorf("%w (the content alone needs about %d MiB; --size auto fits it)", err, (need+1<<20-1)>>20)
		}
		return err
	}
	if err := b.mkfs(ctx, size, inodes); err != nil {
		return Result{}, noSpace(err)
	}
	if err := b.mapInodes(); err != nil {
		return Result{}, err
	}
	if err := b.allocate(ctx); err != nil {
		return Result{}, noSpace(err)
	}
	files, err := b.readBack()
	if err != nil {
		return Result{}, err
	}
	// The contents go to out while e2fsprogs finishes the metadata in
	// its own file: both at once, and e2fsprogs, which flushes the file
	// it works on whenever it closes it, never waits for the contents to
	// reach the disk. The blocks they write are disjoint.
	copied := make(chan error, 1)
	go func() { copied <- b.copyData(ctx, files) }()
	err = b.restoreMetadata(ctx, files)
	if err == nil {
		err = b.finish(ctx)
	}
	if cerr := <-copied; err == nil {
		err = cerr
	}
	if err == nil {
		err = b.assemble(!opts.NoSync)
	}
	if err != nil {
		return Result{}, noSpace(err)
	}
	return Result{Size: size, Inodes: stats.Inodes, UUID: b.uuid}, nil
}

// AutoSize returns a filesystem size that holds the content plus headroom:
// a quarter more (at least 64 MiB) for the guest to write to, the inode
// tables, the journal and group metadata. The image file is sparse, so
// headroom costs no host disk until the guest uses it.
func AutoSize(s fstree.Stats) int64 {
	content := s.DataBlocks + s.LongSymlinks + s.XattrBlocks + dirBlocks(s)
	headroom := max(content/4, (64<<20)/BlockSize)
	blocks := content + headroom
	inodes := InodeCount(s, blocks*BlockSize)
	blocks += inodes*256/BlockSize + JournalBlocks(blocks)
	blocks += blocks/50 + 1024 // bitmaps, descriptors, reserved GDT
	const mib = (1 << 20) / BlockSize
	blocks = (blocks + mib - 1) / mib * mib
	return blocks * BlockSize
}

// dirBlocks estimates the blocks directories need: one each, plus the
// entries at about two thirds fill (hashed directories split leaves).
func dirBlocks(s fstree.Stats) int64 {
	return s.Dirs + s.DirEntryBytes*3/2/BlockSize
}

// InodeCount gives room for many small files: twice the content's inodes,
// and no fewer than one per 16 KiB.
func InodeCount(s fstree.Stats, size int64) int64 {
	return max(s.Inodes*2+1024, size/16384)
}

// JournalBlocks mirrors ext2fs_default_journal_size: how big a journal
// a filesystem of this many blocks gets; 0 (none) below 8 MiB.
func JournalBlocks(blocks int64) int64 {
	switch {
	case blocks < 2048:
		return 0
	case blocks < 32768:
		return 1024
	case blocks < 256*1024:
		return 4096
	case blocks < 512*1024:
		return 8192
	case blocks < 4096*1024:
		return 16384
	case blocks < 8192*1024:
		return 32768
	case blocks < 16384*1024:
		return 65536
	case blocks < 32768*1024:
		return 131072
	}
	return 262144
}

// DeriveUUID makes a version-4-shaped UUID from a purpose and an identity.
func DeriveUUID(purpose, identity string) string {
	u := DeriveID(purpose, identity)
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// DeriveID is DeriveUUID's bytes.
func DeriveID(purpose, identity string) [16]byte {
	h := sha256.Sum256([]byte(purpose + "\x00" + identity))
	var u [16]byte
	copy(u[:], h[:16])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u
}

type builder struct {
	tree *fstree.Tree
	out  string // the image: file contents, then the metadata
	meta string // where e2fsprogs builds the metadata
	size int64
	opts Options
	uuid string
	env  []string

	// inodes lists every inode of the content with its number, in the
	// order the tree walk first met it.
	inodes []numbered
	seen   map[*fstree.Inode]uint32 // the inode number of each inode's first name
	// relinks are names mke2fs gave an inode of their own that belong
	// to another's: see add.
	relinks []relink
	// devices are created by debugfs; each needs its names.
	devices []*device
	// lostFoundAside is the name the image's own /lost+found is built
	// under until restoreMetadata, when it is not a directory; "" if not.
	lostFoundAside string
}

// lostFound is the directory mke2fs always makes and e2fsck reconnects
// orphans to. The image's own /lost+found wins over it, whatever it is.
const lostFound = "lost+found"

// lostFoundIsOther says whether the image has a /lost+found that is not
// a directory.
func (b *builder) lostFoundIsOther() bool {
	lf := b.tree.Root().Child(lostFound)
	return lf != nil && lf.Inode().Type != fstree.TypeDir
}

type numbered struct {
	ino   uint32
	inode *fstree.Inode
	node  *fstree.Node // the first name met, for error messages
	raw   []byte       // the inode as it is before the metadata script
}

type device struct {
	inode *fstree.Inode
	ino   uint32
	names []dirName // where its names go, first one created by mknod
}

type dirName struct {
	dir  uint32
	name string
}

// environ is the environment for e2fsprogs: fixed time, locale and config,
// so that nothing about the host leaks into the image.
func (b *builder) environ() []string {
	fake := max(b.tree.Epoch().Unix(), 1) // e2fsprogs reads 0 as "unset"
	return append(fixedEnv(b.tree.Epoch()),
		"E2FSCK_TIME="+strconv.FormatInt(fake, 10),
		"E2FSCK_CONFIG="+filepath.Join(b.opts.WorkDir, "e2fsck.conf"),
		"MKE2FS_CONFIG="+filepath.Join(b.opts.WorkDir, "mke2fs.conf"),
	)
}

func (b *builder) mkfs(ctx context.Context, size, inodes int64) error {
	if err := os.WriteFile(filepath.Join(b.opts.WorkDir, "mke2fs.conf"), []byte(mke2fsConfig), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.opts.WorkDir, "e2fsck.conf"), []byte(e2fsckConfig), 0o644); err != nil {
		return err
	}
	if err := sizeFile(b.meta, 0, size); err != nil {
		return err
	}
	hashSeed := DeriveUUID("kiln.hash-seed", b.opts.Identity)
	args := []string{
		"-t", "ext4", "-F", "-q",
		"-b", strconv.Itoa(BlockSize), "-I", "256",
		"-N", strconv.FormatInt(inodes, 10),
		"-m", "0",
		"-U", b.uuid,
		"-E", "hash_seed=" + hashSeed + ",root_owner=0:0,nodiscard,assume_storage_prezeroed=1,no_copy_xattrs",
		"-d", b.tree.StagingDir(),
		b.meta, strconv.FormatInt(size/BlockSize, 10),
	}
	if b.lostFoundIsOther() {
		// mke2fs makes its /lost+found directory first and stops at a
		// staged name that is not one: the image's is built under
		// another name, and takes the directory's place in
		// restoreMetadata.
		aside, err := b.stageLostFoundAside()
		if err != nil {
			return err
		}
		defer aside()
	}
	cmd := tool(ctx, "mke2fs", args...)
	cmd.Env = b.env
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(outb.String())
		if strings.Contains(msg, "Could not allocate block") || strings.Contains(msg, "No space left") ||
			strings.Contains(msg, "Could not allocate inode") {
			return fmt.Errorf("%w of %d MiB: %s", ErrNoSpace, size>>20, lastLine(msg))
		}
		return fmt.Errorf("mke2fs: %w: %s", err, msg)
	}
	return nil
}

// stageLostFoundAside picks a name the image does not use for its
// /lost+found, renames the staged entry to it, and returns what renames
// it back. Device nodes are not staged: debugfs creates them under that
// name.
func (b *builder) stageLostFoundAside() (func(), error) {
	root := b.tree.Root()
	name := lostFound + ".kiln"
	for i := 0; root.Child(name) != nil; i++ {
		name = fmt.Sprintf("%s.kiln%d", lostFound, i)
	}
	b.lostFoundAside = name
	staged := b.tree.StagingPath(root.Child(lostFound))
	if _, err := os.Lstat(staged); errors.Is(err, os.ErrNotExist) {
		return func() {}, nil
	}
	aside := filepath.Join(b.tree.StagingDir(), name)
	if err := os.Rename(staged, aside); err != nil {
		return nil, err
	}
	return func() { os.Rename(aside, staged) }, nil
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// mapInodes walks the tree and the new image side by side to learn the
// inode number mke2fs gave every staged name, and where each device node
// (not staged) has to go.
func (b *builder) mapInodes() error {
	im, err := OpenImage(b.meta)
	if err != nil {
		return err
	}
	defer im.Close()
	b.seen = map[*fstree.Inode]uint32{}
	devs := map[*fstree.Inode]*device{}
	b.add(0, rootInode, b.tree.Root())

	var walk func(dir *fstree.Node, ino uint32) error
	walk = func(dir *fstree.Node, ino uint32) error {
		ents, err := im.ReadDir(ino)
		if err != nil {
			return err
		}
		found := make(map[string]bool, len(ents))
		for _, e := range ents {
			name := e.Name
			if dir.Parent() == nil {
				switch {
				case name == lostFound && (dir.Child(name) == nil || b.lostFoundIsOther()):
					continue // made by mke2fs, removed in restoreMetadata
				case name == b.lostFoundAside:
					name = lostFound
				}
			}
			child := dir.Child(name)
			if child == nil {
				return fmt.Errorf("ext4: unexpected entry %q in the built image", e.Name)
			}
			found[name] = true
			b.add(ino, e.Ino, child)
			if child.Inode().Type == fstree.TypeDir {
				if err := walk(child, e.Ino); err != nil {
					return err
				}
			}
		}
		for _, name := range dir.ChildNames() {
			if found[name] {
				continue
			}
			in := dir.Child(name).Inode()
			if !in.Type.IsDevice() {
				return fmt.Errorf("ext4: %q is missing from the built image", dir.Child(name).Path())
			}
			d := devs[in]
			if d == nil {
				d = &device{inode: in}
				devs[in] = d
				b.devices = append(b.devices, d)
			}
			if dir.Parent() == nil && name == lostFound {
				name = b.lostFoundAside
			}
			d.names = append(d.names, dirName{dir: ino, name: name})
		}
		return nil
	}
	return walk(b.tree.Root(), rootInode)
}

// relink is a name in directory dir that must link to inode ino.
type relink struct {
	dir, ino uint32
	name     string
}

// add records the inode mke2fs gave name n in directory dir. mke2fs -d
// makes one inode for the names of a hard-linked regular file, but one
// for each name of a hard-linked symlink: the names after the first are
// linked again to the first's inode.
func (b *builder) add(dir, ino uint32, n *fstree.Node) {
	in := n.Inode()
	if first, ok := b.seen[in]; ok {
		if first != ino {
			b.relinks = append(b.relinks, relink{dir: dir, ino: first, name: n.Name()})
		}
		return
	}
	b.seen[in] = ino
	b.inodes = append(b.inodes, numbered{ino: ino, inode: in, node: n})
}

// allocate runs the debugfs script that creates the device nodes and
// gives every file with content its blocks. debugfs reports the inode
// number of each device node, so that the metadata script can address
// them by number.
func (b *builder) allocate(ctx context.Context) error {
	var s script
	for _, d := range b.devices {
		first := d.names[0]
		name, err := quote(first.name)
		if err != nil {
			return fmt.Errorf("device node %q: %w", "/"+b.tree.Names(d.inode)[0].Path(), err)
		}
		kind := "c"
		if d.inode.Type == fstree.TypeBlock {
			kind = "b"
		}
		s.printf("cd <%d>", first.dir)
		// The numbers are set with the rest of the metadata: debugfs's
		// mknod refuses minors above 65535.
		s.printf("mknod %s %s 0 0", name, kind)
	}
	b.allocateData(&s)
	if s.lines == 0 {
		return nil
	}
	out, err := debugfs(ctx, b.meta, b.opts.WorkDir, &s, b.env)
	if err != nil {
		return err
	}
	inos, err := allocatedInodes(out)
	if err != nil {
		return err
	}
	if len(inos) != len(b.devices) {
		return fmt.Errorf("debugfs created %d of %d device nodes", len(inos), len(b.devices))
	}
	for i, d := range b.devices {
		d.ino = inos[i]
		b.inodes = append(b.inodes, numbered{ino: d.ino, inode: d.inode, node: b.tree.Names(d.inode)[0]})
	}
	return nil
}

// restoreMetadata writes every inode's owner, mode, size, times and
// xattrs, the extra names of device nodes, and marks the files' extents
// written, in one debugfs run.
func (b *builder) restoreMetadata(ctx context.Context, files []placement) error {
	var s script
	if b.tree.Root().Child(lostFound) == nil || b.lostFoundIsOther() {
		// mke2fs always makes one; the image did not have it, or has
		// something else there. e2fsck recreates it only when it has
		// orphans to reconnect. (Not earlier: the blocks it frees must
		// not go to file contents, which the metadata would overwrite.)
		s.printf("rmdir /%s", lostFound)
	}
	values := map[string]string{} // xattr value -> file holding it
	for _, n := range b.inodes {
		in, ino := n.inode, n.ino
		// Only what differs from what mke2fs wrote: setting a field to
		// the value it has changes no byte.
		have := decodeInode(n.raw)
		if mode := uint16(in.Type.FileType() | in.Mode); mode != have.mode {
			s.printf("sif <%d> mode 0%o", ino, mode)
		}
		if in.UID != have.uid {
			s.printf("sif <%d> uid %d", ino, in.UID)
		}
		if in.GID != have.gid {
			s.printf("sif <%d> gid %d", ino, in.GID)
		}
		if in.Type == fstree.TypeReg && uint64(in.Size) != have.size {
			s.printf("sif <%d> size %d", ino, in.Size)
		}
		s.setTime(ino, "atime", in.Atime(), have.atime)
		s.setTime(ino, "mtime", in.Mtime(), have.mtime)
		s.setTime(ino, "ctime", in.Ctime(), have.ctime)
		for _, k := range in.XattrNames() {
			name, err := quote(k)
			if err != nil {
				return fmt.Errorf("xattr of %q: %w", "/"+n.node.Path(), err)
			}
			v := in.Xattrs[k]
			file, ok := values[v]
			if !ok {
				file = filepath.Join(b.opts.WorkDir, fmt.Sprintf("xattr-%d", len(values)))
				if err := os.WriteFile(file, []byte(v), 0o600); err != nil {
					return err
				}
				values[v] = file
			}
			qfile, err := quote(file)
			if err != nil {
				return err
			}
			s.printf("ea_set -f %s <%d> %s", qfile, ino, name)
		}
	}
	if err := b.relinkNames(&s); err != nil {
		return err
	}
	for _, d := range b.devices {
		b0, b1 := EncodeDevice(d.inode.Major, d.inode.Minor)
		s.printf("sif <%d> block[0] 0x%x", d.ino, b0)
		s.printf("sif <%d> block[1] 0x%x", d.ino, b1)
		for _, extra := range d.names[1:] {
			name, err := quote(extra.name)
			if err != nil {
				return err
			}
			s.printf("cd <%d>", extra.dir)
			s.printf("ln <%d> %s", d.ino, name)
		}
		if len(d.names) > 1 {
			s.printf("sif <%d> links_count %d", d.ino, len(d.names))
		}
	}
	if b.lostFoundAside != "" {
		// The image's /lost+found takes its name (ln and unlink leave
		// link counts alone).
		aside, err := quote("/" + b.lostFoundAside)
		if err != nil {
			return err
		}
		s.printf("ln %s /%s", aside, lostFound)
		s.printf("unlink %s", aside)
	}
	markWritten(&s, files)
	_, err := debugfs(ctx, b.meta, b.opts.WorkDir, &s, b.env)
	return err
}

// e2fsckConfig replaces the host's /etc/e2fsck.conf for finish. e2fsck
// would create /lost+found (problem 0x030004, "/lost+found not found"),
// which kiln leaves out when the image does not have it, and would
// replace an image's /lost+found that is not a directory with one
// (0x030017, "/lost+found is not a directory"): the image's entry stays.
const e2fsckConfig = `[problems]
	0x030004 = {
		force_no = true
		no_ok = true
		no_nomsg = true
	}
	0x030017 = {
		force_no = true
		no_ok = true
		no_nomsg = true
	}
`

// finish turns on metadata checksums and indexes the directories.
// mke2fs -d and debugfs insert names one by one, scanning whole
// directories each time, and with checksums they verify every block they
// scan; building without and adding them at the end is about twice as
// fast. tune2fs writes every checksum once, then e2fsck -D hashes large
// directories, as the kernel would have done while they grew. In the
// other order, a directory whose index blocks e2fsck filled has no room
// left for the checksum tail, and tune2fs leaves it invalid.
func (b *builder) finish(ctx context.Context) error {
	for _, args := range [][]string{
		{"tune2fs", "-O", "metadata_csum", b.meta},
		{"e2fsck", "-fyD", b.meta},
	} {
		cmd := tool(ctx, args[0], args[1:]...)
		cmd.Env = b.env
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if args[0] == "e2fsck" && errors.As(err, &ee) && ee.ExitCode() == 1 {
			err = nil // the directories were optimised
		}
		if err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(args[:len(args)-1], " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Check runs e2fsck read-only on an image and returns its report if the
// filesystem is not clean.
func Check(ctx context.Context, image string) error {
	cmd := tool(ctx, "e2fsck", "-fn", image)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("e2fsck -fn %s: %w\n%s", image, err, out)
	}
	return nil
}

// EncodeDevice stores device numbers the way the kernel does: the old
// 8:8-bit form in the first block slot when both fit, else the new form
// (12-bit major, 20-bit minor) in the second.
func EncodeDevice(major, minor uint32) (b0, b1 uint32) {
	if major < 256 && minor < 256 {
		return major<<8 | minor, 0
	}
	return 0, minor&0xff | major<<8 | (minor&^0xff)<<12
}

// Resize grows or shrinks the filesystem in an image file to size bytes
// (rounded down to whole blocks), offline, with resize2fs.
func Resize(ctx context.Context, image string, size int64) error {
	size = size / BlockSize * BlockSize
	fi, err := os.Stat(image)
	if err != nil {
		return err
	}
	if size == fi.Size() {
		return nil
	}
	if size > fi.Size() {
		if err := os.Truncate(image, size); err != nil {
			return err
		}
	}
	cmd := tool(ctx, "resize2fs", "-f", image, strconv.FormatInt(size/1024, 10)+"K")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("resizing to %d bytes: %w: %s", size, err, strings.TrimSpace(string(out)))
	}
	if size < fi.Size() {
		return os.Truncate(image, size)
	}
	return nil
}

// NeedsRecovery reports whether an image's journal holds transactions
// that were not written in place yet (a filesystem that was not cleanly
// unmounted, or whose unmount has not reached the file yet).
func NeedsRecovery(image string) (bool, error) {
	f, err := os.Open(image)
	if err != nil {
		return false, err
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, superblockOffset); err != nil {
		return false, err
	}
	const incompatRecover = 0x4
	return binary.LittleEndian.Uint32(sb[0x60:])&incompatRecover != 0, nil
}

// Recover replays an image's journal, so that it can be mounted read-only
// (the kernel refuses to replay on a read-only device).
func Recover(ctx context.Context, image string) error {
	cmd := tool(ctx, "e2fsck", "-p", "-E", "journal_only", image)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C"}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		err = nil // "errors corrected": the journal was replayed
	}
	if err != nil {
		return fmt.Errorf("replaying the journal of %s: %w: %s", image, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// relinkNames points the names in b.relinks at the inode they share with
// another name, releasing the inode mke2fs made for each.
func (b *builder) relinkNames(s *script) error {
	links := map[uint32]int{}
	var inos []uint32
	for _, r := range b.relinks {
		name, err := quote(r.name)
		if err != nil {
			return err
		}
		s.printf("cd <%d>", r.dir)
		s.printf("rm %s", name)
		s.printf("ln <%d> %s", r.ino, name)
		if links[r.ino] == 0 {
			inos = append(inos, r.ino)
			links[r.ino] = 1
		}
		links[r.ino]++
	}
	for _, ino := range inos {
		s.printf("sif <%d> links_count %d", ino, links[ino])
	}
	return nil
}
