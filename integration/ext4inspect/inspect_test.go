package ext4inspect

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestInspectMke2fsTree builds an image with mke2fs -d from a directory
// made with ordinary system calls and checks that Inspect reports what the
// directory holds.
func TestInspectMke2fsTree(t *testing.T) {
	if _, err := exec.LookPath("mke2fs"); err != nil {
		t.Skip("needs e2fsprogs: mke2fs not found")
	}
	root := os.Geteuid() == 0
	src := filepath.Join(t.TempDir(), "src")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(src, 0o755))
	p := func(name string) string { return filepath.Join(src, name) }

	content := []byte("hello, ext4\n")
	must(os.WriteFile(p("file"), content, 0o644))
	must(os.Link(p("file"), p("hardlink")))
	must(os.Mkdir(p("dir"), 0o755))
	must(unix.Chmod(p("dir"), 0o1777))
	odd := []string{"with space", `quo"te`, `back\slash`, "new\nline", "\xff\xfe", strings.Repeat("n", 255)}
	for _, n := range odd {
		must(os.WriteFile(filepath.Join(p("dir"), n), []byte(n), 0o600))
	}
	must(os.Symlink("file", p("fast")))
	long := "/" + strings.Repeat("t", 3999)
	must(os.Symlink(long, p("slow")))
	must(os.Symlink("q\"\\\nz", p("oddlink")))
	must(unix.Mkfifo(p("fifo"), 0o640))
	// A sparse file: data at both ends of 8 MiB.
	f, err := os.Create(p("sparse"))
	must(err)
	_, err = f.WriteAt([]byte("head"), 0)
	must(err)
	_, err = f.WriteAt([]byte("tail"), 8<<20-4)
	must(err)
	must(f.Close())
	must(unix.Setxattr(p("file"), "user.foo", []byte("bar"), 0))
	must(unix.Setxattr(p("file"), "user.bin", []byte{0, 1, 0xff}, 0))
	must(unix.Setxattr(p("file"), "user.long", bytes.Repeat([]byte("v"), 300), 0))
	if root {
		must(unix.Mknod(p("chr"), unix.S_IFCHR|0o620, int(unix.Mkdev(1, 3))))
		must(unix.Mknod(p("blk"), unix.S_IFBLK|0o600, int(unix.Mkdev(259, 65536))))
		must(os.Lchown(p("file"), 4000000000, 100000))
		must(unix.Setxattr(p("dir"), "trusted.bar", []byte("baz"), 0))
	}
	must(unix.Chmod(p("file"), 0o4755))

	img := filepath.Join(t.TempDir(), "img.ext4")
	cmd := exec.Command("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-E", "root_owner=0:0", "-d", src, img, "64M")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}
	// mke2fs -d keeps whole seconds only: set exact times on /file, one
	// before 1970 and one after 2038, with nanoseconds.
	mtime := time.Date(1960, 5, 6, 7, 8, 9, 123456789, time.UTC)
	atime := time.Date(2100, 1, 1, 0, 0, 0, 5, time.UTC)
	var script strings.Builder
	for field, tm := range map[string]time.Time{"mtime": mtime, "atime": atime} {
		sec := tm.Unix()
		lo := uint32(sec)
		epoch := uint32((sec-int64(int32(lo)))>>32) & 3
		fmt.Fprintf(&script, "sif /file %s_lo 0x%x\nsif /file %s_hi 0x%x\n", field, lo, field, uint32(tm.Nanosecond())<<2|epoch)
	}
	cmd = exec.Command("debugfs", "-w", "-f", "-", img)
	cmd.Stdin = strings.NewReader(script.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}

	start := time.Now()
	fs, err := Inspect(context.Background(), img, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("inspected %d entries in %v", len(fs.Entries), time.Since(start))
	if fs.BlockSize != 4096 || fs.BlockCount != 64<<20/4096 {
		t.Errorf("block size %d count %d", fs.BlockSize, fs.BlockCount)
	}

	// Every name in the source is in the image with the same metadata.
	seen := 0
	err = filepath.Walk(src, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(path, src), "/")
		if path == src {
			rel = "/"
		}
		seen++
		e := fs.Entries[rel]
		if e == nil {
			t.Errorf("%q missing", rel)
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		if rel != "/" {
			if e.Mode != st.Mode&0o7777 || e.UID != st.Uid || e.GID != st.Gid {
				t.Errorf("%q: mode %o uid %d gid %d, want %o %d %d", rel, e.Mode, e.UID, e.GID, st.Mode&0o7777, st.Uid, st.Gid)
			}
			if want := time.Unix(st.Mtim.Sec, 0); rel != "/file" && rel != "/hardlink" && !e.Mtime.Equal(want) {
				t.Errorf("%q: mtime %v, want %v", rel, e.Mtime, want)
			}
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			if e.Type != Regular || e.SHA256 != hex.EncodeToString(sum[:]) || e.Size != st.Size || e.Links != uint32(st.Nlink) {
				t.Errorf("%q: %s size %d links %d sha %s", rel, e.Type, e.Size, e.Links, e.SHA256)
			}
		case unix.S_IFLNK:
			target, _ := os.Readlink(path)
			if e.Type != Symlink || e.Target != target {
				t.Errorf("%q: %s target %q, want %q", rel, e.Type, e.Target, target)
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			want := CharDev
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				want = BlockDev
			}
			if e.Type != want || e.Major != unix.Major(st.Rdev) || e.Minor != unix.Minor(st.Rdev) {
				t.Errorf("%q: %s %d:%d", rel, e.Type, e.Major, e.Minor)
			}
		case unix.S_IFIFO:
			if e.Type != Fifo {
				t.Errorf("%q: %s, want fifo", rel, e.Type)
			}
		case unix.S_IFDIR:
			if e.Type != Dir {
				t.Errorf("%q: %s, want directory", rel, e.Type)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(fs.Entries) != seen+1 || fs.Entries["/lost+found"] == nil {
		t.Errorf("image has %d entries, source %d plus lost+found", len(fs.Entries), seen)
	}

	file := fs.Entries["/file"]
	if !bytes.Equal(file.Xattrs["user.foo"], []byte("bar")) || !bytes.Equal(file.Xattrs["user.bin"], []byte{0, 1, 0xff}) ||
		!bytes.Equal(file.Xattrs["user.long"], bytes.Repeat([]byte("v"), 300)) {
		t.Errorf("xattrs of /file: %q", file.Xattrs)
	}
	if !file.Mtime.Equal(mtime) || !file.Atime.Equal(atime) || file.Mode != 0o4755 {
		t.Errorf("/file: mtime %v atime %v mode %o", file.Mtime, file.Atime, file.Mode)
	}
	if root {
		if file.UID != 4000000000 || file.GID != 100000 {
			t.Errorf("/file: owner %d:%d", file.UID, file.GID)
		}
		if !bytes.Equal(fs.Entries["/dir"].Xattrs["trusted.bar"], []byte("baz")) {
			t.Errorf("/dir xattrs: %q", fs.Entries["/dir"].Xattrs)
		}
	}
	if fs.Entries["/file"].Ino != fs.Entries["/hardlink"].Ino || file.Links != 2 {
		t.Errorf("hard link: inodes %d %d, links %d", fs.Entries["/file"].Ino, fs.Entries["/hardlink"].Ino, file.Links)
	}
	if got := fs.Names(file.Ino); len(got) != 2 {
		t.Errorf("Names: %q", got)
	}
	if s := fs.Entries["/sparse"]; !s.Sparse || s.Size != 8<<20 {
		t.Errorf("/sparse: sparse %v size %d blocks %d", s.Sparse, s.Size, s.Blocks)
	}
	if file.Sparse {
		t.Errorf("/file reported sparse")
	}

	// A path list inspects just those paths.
	some, err := Inspect(context.Background(), img, Options{Paths: []string{"/dir/new\nline", "/slow", "/nothing/here"}, NoContent: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(some.Entries) != 2 || some.Entries["/slow"].Target != long || some.Entries["/dir/new\nline"] == nil {
		t.Errorf("path list: %v", some.Paths())
	}
	if _, err := Stat(context.Background(), img, "/nothing"); err == nil {
		t.Error("Stat of a missing path: no error")
	}
}
