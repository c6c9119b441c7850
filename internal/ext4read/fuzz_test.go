package ext4read_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/ext4read"
	"github.com/kilnfs/kiln/internal/ext4read/ext4test"
)

// fuzzSeeds makes small images of every layout the reader handles: extents
// and block maps, 1 and 4 KiB blocks, meta_bg, a hashed directory, a
// journal that needs recovery.
func fuzzSeeds(f testing.TB) [][]byte {
	stage := f.TempDir()
	put := func(name string, data []byte) {
		p := filepath.Join(stage, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			f.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			f.Fatal(err)
		}
	}
	put("a", []byte("hi\n"))
	put("ind", ext4test.Pattern(20000, 1)) // past the direct blocks of a block map
	for i := range 40 {
		put(fmt.Sprintf("d/entry-with-a-long-name-%d", i), []byte{byte(i)})
	}
	if err := os.Symlink("a", filepath.Join(stage, "fast")); err != nil {
		f.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("s", 80), filepath.Join(stage, "slow")); err != nil {
		f.Fatal(err)
	}
	if err := os.Link(filepath.Join(stage, "a"), filepath.Join(stage, "d/link")); err != nil {
		f.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(stage, "fifo"), 0o644); err != nil {
		f.Fatal(err)
	}
	sparse, err := os.Create(filepath.Join(stage, "sparse"))
	if err != nil {
		f.Fatal(err)
	}
	sparse.WriteAt([]byte("x"), 50000)
	sparse.Close()

	var seeds [][]byte
	for _, c := range []struct {
		size string
		args []string
	}{
		{"256K", []string{"-b", "1024", "-O", "^has_journal", "-N", "64"}},
		{"256K", []string{"-t", "ext2", "-b", "1024", "-N", "64"}},
		{"1M", []string{"-O", "^has_journal,meta_bg,^resize_inode", "-N", "64"}},
		{"3M", []string{"-b", "1024", "-J", "size=1", "-N", "64"}},
	} {
		img := ext4test.Mkfs(f, stage, c.size, c.args...)
		ext4test.SetXattrs(f, img, "/a", map[string][]byte{"user.in": []byte("x"), "user.out": ext4test.Pattern(400, 2), "system.posix_acl_access": testACL})
		ext4test.Fsck(f, img, "-fyD")
		if slicesContain(c.args, "-J") {
			out := strings.Fields(ext4test.Run(f, "debugfs", "-R", "bmap /a 0", img))
			blk := out[len(out)-1]
			cmds := []string{"jo -c", fmt.Sprintf("jw -b %s %s", blk, filepath.Join(stage, "ind")), "jw -r 5", fmt.Sprintf("jw -c -b %s %s", blk, filepath.Join(stage, "ind")), "jc"}
			ext4test.Debugfs(f, img, cmds...)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// TestFuzzSeeds checks that the seeds are valid images: the fuzzer
// starts from what the reader reads whole.
func TestFuzzSeeds(t *testing.T) {
	ext4test.Require(t)
	for i, s := range fuzzSeeds(t) {
		fsys, err := ext4read.Open(bytes.NewReader(s), int64(len(s)), ext4read.Options{})
		if err != nil {
			t.Fatalf("seed %d: %v", i, err)
		}
		n := 0
		err = fsys.Walk(fsys.Root(), func(path string, in *ext4read.Inode) error {
			n++
			if _, err := fsys.Xattrs(in.Ino); err != nil {
				return err
			}
			if in.Type == ext4read.TypeRegular {
				f, err := fsys.Open(in.Ino)
				if err != nil {
					return err
				}
				_, err = io.Copy(io.Discard, f)
				return err
			}
			return nil
		})
		if err != nil || n < 45 {
			t.Fatalf("seed %d: %d entries, %v", i, n, err)
		}
	}
}

// FuzzOpenWalk opens an image, walks it and reads every file's content
// (up to a cap), symlink and xattrs. It must never panic, hang or
// allocate without bound; errors are expected.
func FuzzOpenWalk(f *testing.F) {
	ext4test.Require(f)
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		fsys, err := ext4read.Open(bytes.NewReader(img), int64(len(img)), ext4read.Options{MaxEntries: 5000, MaxDepth: 64})
		if err != nil {
			return
		}
		budget := int64(4 << 20) // content bytes to read from this image
		walkErr := fsys.Walk(fsys.Root(), func(path string, in *ext4read.Inode) error {
			fsys.Xattrs(in.Ino)
			switch in.Type {
			case ext4read.TypeRegular:
				f, err := fsys.Open(in.Ino)
				if err != nil {
					return nil
				}
				n := min(in.Size, budget, 1<<20)
				m, _ := io.CopyN(io.Discard, f, n)
				budget -= m
				f.ReadAt(make([]byte, 100), in.Size-50)
			case ext4read.TypeSymlink:
				fsys.Readlink(in.Ino)
			case ext4read.TypeDir:
				fsys.ReadDir(in.Ino)
			}
			return nil
		})
		if walkErr != nil && !errors.Is(walkErr, ext4read.ErrCorrupt) && !errors.Is(walkErr, ext4read.ErrLimit) &&
			!errors.Is(walkErr, ext4read.ErrUnsupported) && !strings.Contains(walkErr.Error(), "not a") {
			t.Errorf("walk error of no known kind: %v", walkErr)
		}
		for _, p := range []string{"/a", "/d/link", "/d/entry-with-a-long-name-7"} {
			fsys.Lookup(p)
		}
	})
}
