// Package ext4test builds and edits ext4 images with e2fsprogs for tests
// of the packages that read them.
package ext4test

import (
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/testenv"
)

// e2fsprogs installs its tools in sbin directories that a user's PATH may
// leave out.
var sbinDirs = []string{"/usr/sbin", "/sbin"}

func tool(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// Require skips the test (fails it in CI) when e2fsprogs is missing.
func Require(t testing.TB) {
	t.Helper()
	for _, name := range []string{"mke2fs", "debugfs", "e2fsck"} {
		if tool(name) == "" {
			testenv.Unavailable(t, "%s (e2fsprogs) is not installed", name)
		}
	}
}

// Run runs an e2fsprogs tool and returns its combined output, failing the
// test if it exits non-zero.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RunErr is Run without the test: for tools whose exit status carries
// information (e2fsck).
func RunErr(name string, args ...string) (string, error) {
	p := tool(name)
	if p == "" {
		p = name
	}
	cmd := exec.Command(p, args...)
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME=1700000000")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Mkfs makes an ext4 image of size (mke2fs syntax, "16M") holding the tree
// at dir ("" for an empty filesystem), with 4 KiB blocks and 256-byte
// inodes unless args say otherwise (-t, -b, -I), and returns its path.
func Mkfs(t testing.TB, dir, size string, args ...string) string {
	t.Helper()
	Require(t)
	img := filepath.Join(t.TempDir(), "fs.img")
	all := []string{"-F", "-q", "-E", "root_owner=0:0"}
	for _, d := range [][2]string{{"-t", "ext4"}, {"-b", "4096"}, {"-I", "256"}} {
		if !slices.Contains(args, d[0]) {
			all = append(all, d[0], d[1])
		}
	}
	all = append(all, args...)
	if dir != "" {
		all = append(all, "-d", dir)
	}
	Run(t, "mke2fs", append(all, img, size)...)
	if dir != "" && os.Geteuid() != 0 {
		rootOwned(t, img, dir)
	}
	return img
}

// rootOwned makes the files copied from dir owned by root, as they are
// when the tests run as root (in CI): mke2fs -d copies owners.
func rootOwned(t testing.TB, img, dir string) {
	t.Helper()
	var cmds []string
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		name := strconv.Quote("/" + filepath.ToSlash(rel))
		cmds = append(cmds, "sif "+name+" uid 0", "sif "+name+" gid 0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	Debugfs(t, img, cmds...)
}

// Debugfs runs commands, one a line, in one writable debugfs run and
// returns its output. debugfs reports most failures only in its output,
// so callers check what they depend on.
func Debugfs(t testing.TB, img string, cmds ...string) string {
	t.Helper()
	script := filepath.Join(t.TempDir(), "cmds")
	if err := os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return Run(t, "debugfs", "-w", "-f", script, img)
}

// Fsck runs e2fsck with args on img and returns its output; exit
// statuses 1 and 2 (errors corrected) are success.
func Fsck(t testing.TB, img string, args ...string) string {
	t.Helper()
	out, err := RunErr("e2fsck", append(args, img)...)
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() <= 2 {
		err = nil
	}
	if err != nil {
		t.Fatalf("e2fsck %s %s: %v\n%s", strings.Join(args, " "), img, err, out)
	}
	return out
}

// SetXattrs sets extended attributes of the file at path in img with
// debugfs, which (unlike the host filesystem a test runs on) takes any
// namespace, and stores POSIX ACLs given in getxattr's form as ext4 does.
func SetXattrs(t testing.TB, img, path string, x map[string][]byte) {
	t.Helper()
	dir := t.TempDir()
	var cmds []string
	for i, name := range slices.Sorted(maps.Keys(x)) {
		f := filepath.Join(dir, strconv.Itoa(i))
		if err := os.WriteFile(f, x[name], 0o644); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, fmt.Sprintf("ea_set -f %s %s %s", f, path, name))
	}
	if out := Debugfs(t, img, cmds...); strings.Contains(out, "ea_set:") {
		t.Fatalf("setting xattrs of %s:\n%s", path, out)
	}
}

// Copy copies the image at src to a new file and returns its path.
func Copy(t testing.TB, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

// Pattern returns n pseudo-random bytes, the same for the same seed.
func Pattern(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// WriteFile writes a file of a staging tree, its directories made as
// needed, with exactly mode (the umask left out).
func WriteFile(t testing.TB, path string, data []byte, mode uint32) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// Open opens an image with ext4read, for the rest of the test.
func Open(t testing.TB, img string) *ext4read.FS {
	t.Helper()
	fsys, f, err := ext4read.OpenFile(img, ext4read.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fsys
}

// Describe returns every entry of an image by path, as debugfs (the
// reference reader) reports it: type, mode, owner, link count, times
// with nanoseconds, extended attributes, symlink target, device numbers,
// the size of what is not a directory, and for regular files a digest of
// their content (read with ext4read). Names that are hard links of one
// inode say so. Two images hold the same tree when their descriptions
// are equal, however differently they lay it out.
func Describe(t testing.TB, img string) map[string]string {
	t.Helper()
	fsys := Open(t, img)
	type named struct {
		path string
		in   *ext4read.Inode
	}
	var ents []named
	first := map[uint32]string{}
	if err := fsys.Walk(fsys.Root(), func(p string, in *ext4read.Inode) error {
		ents = append(ents, named{p, in})
		return nil
	}); err != nil {
		t.Fatalf("walking %s: %v", img, err)
	}
	var cmds []string
	for _, e := range ents {
		cmds = append(cmds, fmt.Sprintf("stat <%d>", e.in.Ino))
	}
	script := filepath.Join(t.TempDir(), "cmds")
	if err := os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := Run(t, "debugfs", "-f", script, img)
	if strings.Contains(out, "checksum does not match") || strings.Contains(out, "Filesystem not open") {
		t.Fatalf("debugfs cannot read %s cleanly:\n%.2000s", img, out)
	}
	stats := strings.Split(out, "debugfs: stat <")[1:]
	if len(stats) != len(ents) {
		t.Fatalf("debugfs reported %d inodes of %s, want %d", len(stats), img, len(ents))
	}
	desc := make(map[string]string, len(ents))
	for i, e := range ents {
		if p, ok := first[e.in.Ino]; ok && e.in.Type != ext4read.TypeDir {
			desc[e.path] = "hard link of " + p
			continue
		}
		first[e.in.Ino] = e.path
		d := describeStat(stats[i], e.in.Type == ext4read.TypeDir)
		if e.in.Type == ext4read.TypeRegular {
			f, err := fsys.Open(e.in.Ino)
			if err != nil {
				t.Fatalf("%s: %v", e.path, err)
			}
			h := sha256.New()
			if _, err := io.Copy(h, io.NewSectionReader(f, 0, f.Size())); err != nil {
				t.Fatalf("reading %s of %s: %v", e.path, img, err)
			}
			d += fmt.Sprintf("content %x\n", h.Sum(nil))
		}
		if e.in.Type == ext4read.TypeSymlink {
			target, err := fsys.Readlink(e.in.Ino)
			if err != nil {
				t.Fatalf("%s: %v", e.path, err)
			}
			d += fmt.Sprintf("target %q\n", target)
		}
		desc[e.path] = d
	}
	return desc
}

// describeStat keeps the lines of a debugfs stat report that say what a
// file is, and drops those that say where or how it is stored (inode
// number, flags, blocks, checksums, creation time).
func describeStat(stat string, dir bool) string {
	var b strings.Builder
	var xattrs []string // sorted below: each writer has its own order
	inXattrs := false
	for _, line := range strings.Split(stat, "\n") {
		f := strings.Fields(line)
		switch {
		case inXattrs && strings.HasPrefix(line, "  "):
			xattrs = append(xattrs, "xattr "+strings.TrimSpace(line)+"\n")
			continue
		case strings.HasPrefix(line, "Extended attributes:"):
			inXattrs = true
			continue
		}
		inXattrs = false
		switch {
		case strings.HasPrefix(line, "Inode:"):
			// "Inode: N   Type: T    Mode:  M   Flags: F"
			b.WriteString(strings.Join(f[2:len(f)-2], " ") + "\n")
		case strings.HasPrefix(line, "User:"):
			if dir {
				f = f[:len(f)-2] // directories' sizes depend on the layout
			}
			b.WriteString(strings.Join(f, " ") + "\n")
		case strings.HasPrefix(line, "Links:"):
			b.WriteString(strings.Join(f[:2], " ") + "\n")
		case strings.HasPrefix(strings.TrimSpace(line), "ctime:"), strings.HasPrefix(strings.TrimSpace(line), "atime:"),
			strings.HasPrefix(strings.TrimSpace(line), "mtime:"):
			b.WriteString(strings.Join(f[:2], " ") + "\n")
		case strings.HasPrefix(line, "Fast link dest:"), strings.HasPrefix(line, "Device major/minor"):
			b.WriteString(strings.TrimSpace(line) + "\n")
		}
	}
	slices.Sort(xattrs)
	b.WriteString(strings.Join(xattrs, ""))
	return b.String()
}
