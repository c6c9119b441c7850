// Package ext4inspect reads an ext4 image back with debugfs, without
// mounting it and without any of kiln's code, so that tests can state what
// an image holds independently of how it was built.
//
// It walks the directory tree with `ls -p`, one debugfs run per tree level,
// then stats and dumps every inode in one more batched run (and one last
// run for extended attribute values that `stat` leaves out). Inodes are
// always addressed by number (<N>), so no file name ever has to be quoted
// into a debugfs command.
package ext4inspect

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
)

// Type is the kind of an inode.
type Type string

const (
	Regular  Type = "regular"
	Dir      Type = "directory"
	Symlink  Type = "symlink"
	CharDev  Type = "char"
	BlockDev Type = "block"
	Fifo     Type = "fifo"
	Socket   Type = "socket"
)

// typeOfMode maps the file type bits of i_mode to a Type.
func typeOfMode(mode uint32) Type {
	switch mode & 0o170000 {
	case 0o100000:
		return Regular
	case 0o040000:
		return Dir
	case 0o120000:
		return Symlink
	case 0o020000:
		return CharDev
	case 0o060000:
		return BlockDev
	case 0o010000:
		return Fifo
	case 0o140000:
		return Socket
	}
	return Type(fmt.Sprintf("mode(%o)", mode&0o170000))
}

// Entry is one name in the image and what its inode holds.
type Entry struct {
	Path  string // "/" for the root, else "/a/b"; bytes as stored
	Ino   uint32
	Type  Type
	Mode  uint32 // permission bits with setuid, setgid and sticky (07777)
	UID   uint32
	GID   uint32
	Links uint32
	Size  int64
	// Blocks is i_blocks in 512-byte units (extent tree and xattr
	// blocks included).
	Blocks int64
	Mtime  time.Time
	Atime  time.Time
	Ctime  time.Time
	// Major and Minor are set for device nodes.
	Major, Minor uint32
	// Target is a symlink's target, exactly as stored.
	Target string
	// Xattrs maps attribute names (with their namespace prefix) to raw
	// values; nil when there are none.
	Xattrs map[string][]byte
	// SHA256 is the hex digest of a regular file's content, unless
	// Options.NoContent.
	SHA256 string
	// Sparse says that a regular file has fewer data blocks than its size
	// needs: it has holes.
	Sparse bool
}

// FS is what Inspect found.
type FS struct {
	BlockSize  int64
	BlockCount int64
	// Entries maps each path to its entry.
	Entries map[string]*Entry
}

// Paths returns the paths in Entries, sorted bytewise.
func (fs *FS) Paths() []string {
	out := make([]string, 0, len(fs.Entries))
	for p := range fs.Entries {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// Names returns the paths of Entries that share inode ino, sorted.
func (fs *FS) Names(ino uint32) []string {
	var out []string
	for p, e := range fs.Entries {
		if e.Ino == ino {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// Options narrow an inspection.
type Options struct {
	// Paths limits the result to these absolute paths (only the
	// directories leading to them are listed). Empty means the whole
	// tree. Paths that do not exist are simply absent from the result.
	Paths []string
	// NoContent skips dumping and hashing regular files.
	NoContent bool
}

const rootIno = 2

// fastLinkMax is the longest target ext4 keeps inside the inode.
const fastLinkMax = 59

// Inspect reads the image at path.
func Inspect(ctx context.Context, image string, opts Options) (*FS, error) {
	tmp, err := os.MkdirTemp("", "ext4inspect-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	r := &runner{image: image, tmp: tmp}

	wanted := map[string]bool{}
	for _, p := range opts.Paths {
		wanted[cleanPath(p)] = true
	}
	want := func(p string) bool { return len(wanted) == 0 || wanted[p] }
	descend := func(p string) bool {
		if len(wanted) == 0 {
			return true
		}
		for w := range wanted {
			if p == "/" || strings.HasPrefix(w, p+"/") {
				return true
			}
		}
		return false
	}

	fs := &FS{Entries: map[string]*Entry{}}
	type dir struct {
		path string
		ino  uint32
	}
	names := map[string]uint32{} // path -> inode, for what the result holds
	lsMode := map[uint32]dirEntry{}
	if want("/") {
		names["/"] = rootIno
	}

	// List the tree, one level per debugfs run.
	level := []dir{{"/", rootIno}}
	first := true
	for len(level) > 0 {
		var cmds []string
		if first {
			cmds = append(cmds, "stats -h")
		}
		for _, d := range level {
			cmds = append(cmds, fmt.Sprintf("ls -p <%d>", d.ino))
		}
		secs, err := r.run(ctx, cmds)
		if err != nil {
			return nil, err
		}
		if first {
			if fs.BlockSize, fs.BlockCount, err = parseSuper(secs[0]); err != nil {
				return nil, err
			}
			secs = secs[1:]
			first = false
		}
		var next []dir
		for i, d := range level {
			ents, err := parseLs(secs[i])
			if err != nil {
				return nil, fmt.Errorf("listing %q: %w", d.path, err)
			}
			for _, e := range ents {
				p := join(d.path, e.Name)
				if want(p) {
					names[p] = e.Ino
					lsMode[e.Ino] = e
				}
				if typeOfMode(e.Mode) == Dir && descend(p) {
					next = append(next, dir{p, e.Ino})
				}
			}
		}
		level = next
	}

	// Stat every inode, and dump regular files and slow symlinks.
	inos := uniqueInodes(names)
	var cmds []string
	dumped := map[uint32]string{}
	for _, ino := range inos {
		cmds = append(cmds, fmt.Sprintf("stat <%d>", ino))
		e, listed := lsMode[ino]
		if !listed {
			continue
		}
		t := typeOfMode(e.Mode)
		if (t == Regular && !opts.NoContent) || (t == Symlink && e.Size > fastLinkMax) {
			file := filepath.Join(tmp, fmt.Sprint(ino))
			cmds = append(cmds, fmt.Sprintf("dump <%d> %s", ino, quote(file)))
			dumped[ino] = file
		}
	}
	secs, err := r.run(ctx, cmds)
	if err != nil {
		return nil, err
	}
	stats := map[uint32]*inodeStat{}
	for i, c := range cmds {
		if !strings.HasPrefix(c, "stat ") {
			continue
		}
		st, err := parseStat(secs[i])
		if err != nil {
			return nil, err
		}
		stats[st.Ino] = st
	}

	// Fetch what stat left out: long attribute values, and targets of
	// short symlinks that are not stored in the inode.
	cmds = nil
	type longAttr struct {
		ino  uint32
		name string
		file string
	}
	var longs []longAttr
	for _, ino := range inos {
		st := stats[ino]
		if st == nil {
			return nil, fmt.Errorf("no stat output for inode %d", ino)
		}
		for _, name := range slices.Sorted(maps.Keys(st.LongXattrs)) {
			file := filepath.Join(tmp, fmt.Sprintf("xattr-%d", len(longs)))
			if strings.ContainsAny(name, "\n\r") {
				return nil, fmt.Errorf("inode %d: xattr name %q cannot be passed to debugfs", ino, name)
			}
			cmds = append(cmds, fmt.Sprintf("ea_get -f %s <%d> %s", quote(file), ino, quote(name)))
			longs = append(longs, longAttr{ino, name, file})
		}
		if st.Type == Symlink && !st.FastLink && dumped[ino] == "" {
			file := filepath.Join(tmp, fmt.Sprint(ino))
			cmds = append(cmds, fmt.Sprintf("dump <%d> %s", ino, quote(file)))
			dumped[ino] = file
		}
	}
	if len(cmds) > 0 {
		if _, err := r.run(ctx, cmds); err != nil {
			return nil, err
		}
	}
	for _, l := range longs {
		v, err := os.ReadFile(l.file)
		if err != nil {
			return nil, fmt.Errorf("inode %d: xattr %q: %w", l.ino, l.name, err)
		}
		if len(v) != stats[l.ino].LongXattrs[l.name] {
			return nil, fmt.Errorf("inode %d: xattr %q: got %d bytes, stat says %d", l.ino, l.name, len(v), stats[l.ino].LongXattrs[l.name])
		}
		st := stats[l.ino]
		if st.Xattrs == nil {
			st.Xattrs = map[string][]byte{}
		}
		st.Xattrs[l.name] = v
	}

	// Hash contents and read slow symlink targets.
	sums := map[uint32]string{}
	targets := map[uint32]string{}
	for ino, file := range dumped {
		st := stats[ino]
		switch st.Type {
		case Regular:
			sum, n, err := hashFile(file)
			if err != nil {
				return nil, fmt.Errorf("inode %d: %w", ino, err)
			}
			if n != st.Size {
				return nil, fmt.Errorf("inode %d: dumped %d bytes of %d", ino, n, st.Size)
			}
			sums[ino] = sum
		case Symlink:
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, fmt.Errorf("inode %d: symlink target: %w", ino, err)
			}
			if int64(len(b)) != st.Size {
				return nil, fmt.Errorf("inode %d: symlink target is %d bytes, size says %d", ino, len(b), st.Size)
			}
			targets[ino] = string(b)
		}
		os.Remove(file)
	}

	for p, ino := range names {
		st := stats[ino]
		if e, ok := lsMode[ino]; ok && typeOfMode(e.Mode) != st.Type {
			return nil, fmt.Errorf("%q: ls says %s, stat says %s", p, typeOfMode(e.Mode), st.Type)
		}
		ent := &Entry{
			Path: p, Ino: ino, Type: st.Type, Mode: st.Mode, UID: st.UID, GID: st.GID,
			Links: st.Links, Size: st.Size, Blocks: st.Blocks,
			Mtime: st.Mtime, Atime: st.Atime, Ctime: st.Ctime,
			Xattrs: st.Xattrs, SHA256: sums[ino],
		}
		if st.HasDevice {
			ent.Major, ent.Minor = st.Major, st.Minor
		}
		if st.Type == Symlink {
			ent.Target = st.Target
			if !st.FastLink {
				ent.Target = targets[ino]
			}
		}
		if st.Type == Regular {
			ent.Sparse = dataBytes(st, fs.BlockSize) < roundUp(st.Size, fs.BlockSize)
		}
		fs.Entries[p] = ent
	}
	return fs, nil
}

// dataBytes is how much of the inode's allocation holds data: i_blocks
// without the external xattr block.
func dataBytes(st *inodeStat, blockSize int64) int64 {
	n := st.Blocks * 512
	if st.Flags&hugeFileFlag != 0 {
		n = st.Blocks * blockSize
	}
	if st.FileACL != 0 {
		n -= blockSize
	}
	return n
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

func hashFile(file string) (string, int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func uniqueInodes(names map[string]uint32) []uint32 {
	seen := map[uint32]bool{}
	var out []uint32
	for _, ino := range names {
		if !seen[ino] {
			seen[ino] = true
			out = append(out, ino)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func join(dir, name string) string {
	if dir == "/" {
		return "/" + name
	}
	return dir + "/" + name
}

// cleanPath turns "a/b", "/a/b/" into "/a/b" without interpreting "..",
// which an image path never needs.
func cleanPath(p string) string {
	parts := strings.Split(p, "/")
	var keep []string
	for _, c := range parts {
		if c != "" && c != "." {
			keep = append(keep, c)
		}
	}
	return "/" + strings.Join(keep, "/")
}

// quote makes one debugfs word: double quotes, with "" for a quote.
func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

type runner struct {
	image string
	tmp   string
	n     int
}

// run executes commands in one debugfs run (read-only) and returns each
// command's output. Any error debugfs reports fails the run: debugfs
// itself exits 0 whatever happens.
func (r *runner) run(ctx context.Context, cmds []string) ([]string, error) {
	for _, c := range cmds {
		if strings.ContainsAny(c, "\n\r") {
			return nil, fmt.Errorf("debugfs command %q has a line break", c)
		}
	}
	r.n++
	script := filepath.Join(r.tmp, fmt.Sprintf("script-%d", r.n))
	if err := os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o600); err != nil {
		return nil, err
	}
	defer os.Remove(script)
	cmd := exec.CommandContext(ctx, "debugfs", "-f", script, r.image)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "TZ=UTC"}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("debugfs %s: %w: %s", r.image, err, strings.TrimSpace(stderr.String()))
	}
	if msg := stderrErrors(stderr.String()); msg != "" {
		return nil, fmt.Errorf("debugfs %s: %s", r.image, msg)
	}
	return splitSections(stdout.String(), cmds)
}

// stderrErrors returns what debugfs printed on stderr besides its banner.
func stderrErrors(s string) string {
	var errs []string
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "debugfs ") && strings.HasSuffix(line, ")") {
			continue
		}
		errs = append(errs, line)
		if len(errs) == 10 {
			errs = append(errs, "...")
			break
		}
	}
	return strings.Join(errs, "; ")
}

// ErrNotFound is returned by Stat for a path that is not in the image.
var ErrNotFound = errors.New("not in the image")

// Stat inspects one path.
func Stat(ctx context.Context, image, path string) (*Entry, error) {
	fs, err := Inspect(ctx, image, Options{Paths: []string{path}})
	if err != nil {
		return nil, err
	}
	e := fs.Entries[cleanPath(path)]
	if e == nil {
		return nil, fmt.Errorf("%q: %w", path, ErrNotFound)
	}
	return e, nil
}
