package fusedisk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/fusedisk"
	"github.com/kilnfs/kiln/internal/fusedisk/fusedisktest"
)

// imageFile writes size random bytes to a file and returns its path and
// the bytes.
func imageFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(data)
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// An odd size: the last page is partial.
const oddSize = 3<<20 + 12345

func TestReadThrough(t *testing.T) {
	path, data := imageFile(t, oddSize)
	src := fusedisktest.OpenFile(t, path)
	d := fusedisktest.Mount(t, src, fusedisk.Options{Name: "disk.img"})
	if want := filepath.Join(filepath.Dir(d.Path()), "disk.img"); d.Path() != want {
		t.Errorf("Path() = %s, want %s", d.Path(), want)
	}

	// Random reads first, from several goroutines, while nothing is in
	// the page cache; then the whole file.
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 7))
			for range 40 {
				off := r.IntN(len(data))
				if g == 0 {
					off = len(data) - r.IntN(8192) - 1 // the partial end
				}
				buf := make([]byte, 1+r.IntN(300<<10))
				n, err := f.ReadAt(buf, int64(off))
				want := data[off:min(off+len(buf), len(data))]
				if n != len(want) || (err != nil && !(err == io.EOF && n < len(buf))) {
					t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d", len(buf), off, n, err, len(want))
					return
				}
				if !bytes.Equal(buf[:n], want) {
					t.Errorf("ReadAt(%d bytes at %d): wrong bytes", len(buf), off)
					return
				}
			}
		})
	}
	wg.Wait()
	got, err := os.ReadFile(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("ReadFile: %d bytes differ from the image's %d", len(got), len(data))
	}
	reads, n, largest := src.Counts()
	t.Logf("the source served %d reads, %d bytes, the largest %d bytes", reads, n, largest)

	fi, err := os.Stat(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode() != 0o444 || fi.Size() != oddSize || fi.ModTime().Unix() != 0 || st.Ino != 2 || st.Nlink != 1 {
		t.Errorf("file mode %v size %d mtime %v inode %d links %d; want 0444, %d, the epoch, 2, 1",
			fi.Mode(), fi.Size(), fi.ModTime(), st.Ino, st.Nlink, oddSize)
	}
	entries, err := os.ReadDir(filepath.Dir(d.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "disk.img" {
		t.Errorf("directory holds %v, want disk.img alone", entries)
	}
}

// TestReadahead: reading sequentially, the kernel asks for 1 MiB at a
// time (as root, which may raise the mount's readahead).
func TestReadahead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root may raise a FUSE mount's readahead beyond 128 KiB")
	}
	path, _ := imageFile(t, 16<<20)
	src := fusedisktest.OpenFile(t, path)
	d := fusedisktest.Mount(t, src, fusedisk.Options{})
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyBuffer(io.Discard, f, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	reads, _, largest := src.Counts()
	if largest != 1<<20 || reads > 24 {
		t.Errorf("16 MiB read in %d reads of at most %d bytes, want about 16 of 1 MiB", reads, largest)
	}
}

// blockingSource blocks reads that start in the first 512 KiB until
// release is closed or their context ends, and serves the others at once.
type blockingSource struct {
	size    int64
	release chan struct{}
	ctxs    chan context.Context
}

func (s *blockingSource) Size() int64 { return s.size }

func (s *blockingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 512<<10 {
		select {
		case s.ctxs <- ctx:
		default:
		}
		<-s.release // ignores ctx: Read must not wait for it
	}
	clear(p)
	return len(p), nil
}

// TestSlowChunk: a read that the source holds up does not hold up reads
// of other parts of the image.
func TestSlowChunk(t *testing.T) {
	src := &blockingSource{size: 8 << 20, release: make(chan struct{}), ctxs: make(chan context.Context, 1)}
	d := fusedisktest.Mount(t, src, fusedisk.Options{Timeout: time.Minute})
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	slow := make(chan error, 1)
	go func() {
		_, err := f.ReadAt(make([]byte, 4096), 0)
		slow <- err
	}()
	<-src.ctxs // the slow read has reached the source
	start := time.Now()
	if _, err := f.ReadAt(make([]byte, 4096), 4<<20); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("a read elsewhere took %v while the first chunk was slow", took)
	}
	select {
	case err := <-slow:
		t.Fatalf("the slow read finished before its release: %v", err)
	default:
	}
	close(src.release)
	if err := <-slow; err != nil {
		t.Errorf("the slow read, released: %v", err)
	}
}

// logs captures what is logged while the test runs.
func logs(t *testing.T) *syncBuffer {
	var buf syncBuffer
	out := log.L.Logger.Out
	log.L.Logger.SetOutput(&buf)
	t.Cleanup(func() { log.L.Logger.SetOutput(out) })
	return &buf
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestReadTimeout: a source that never answers, even past its context,
// gives the reader EIO after the timeout, cancels the context and logs
// the read.
func TestReadTimeout(t *testing.T) {
	logged := logs(t)
	src := &blockingSource{size: 1 << 20, release: make(chan struct{}), ctxs: make(chan context.Context, 1)}
	t.Cleanup(func() { close(src.release) })
	const timeout = time.Second
	d := fusedisktest.Mount(t, src, fusedisk.Options{Timeout: timeout})
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	_, err = f.ReadAt(make([]byte, 4096), 8192)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("read from a source that blocks: %v, want EIO", err)
	}
	// Not twice the timeout: the kernel's retry of the failed readahead
	// must not wait another timeout.
	if took < timeout || took > timeout*7/4 {
		t.Errorf("the read failed after %v, want about %v", took, timeout)
	}
	select {
	case ctx := <-src.ctxs:
		if ctx.Err() != context.DeadlineExceeded {
			t.Errorf("the source's context: %v, want it past its deadline", ctx.Err())
		}
	default:
		t.Error("the read never reached the source")
	}
	checkLogged(t, logged.String(), "no data after 1s")
}

// checkLogged checks that an error line names the read's offset and
// length and says why.
func checkLogged(t *testing.T, logged, why string) {
	t.Helper()
	for _, line := range strings.Split(logged, "\n") {
		if strings.Contains(line, "level=error") && strings.Contains(line, "offset=") &&
			strings.Contains(line, "length=") && strings.Contains(line, why) {
			return
		}
	}
	t.Errorf("no error line with the offset, length and %q; logged:\n%s", why, logged)
}

type failingSource struct{ size int64 }

func (s failingSource) Size() int64 { return s.size }

func (s failingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("chunk at %d: digest mismatch", off)
}

func TestReadError(t *testing.T) {
	logged := logs(t)
	d := fusedisktest.Mount(t, failingSource{size: 1 << 20}, fusedisk.Options{})
	start := time.Now()
	_, err := os.ReadFile(d.Path())
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("read from a failing source: %v, want EIO", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the failing read took %v", took)
	}
	checkLogged(t, logged.String(), "digest mismatch")
}

func TestReadOnly(t *testing.T) {
	path, _ := imageFile(t, 8192)
	d := fusedisktest.Mount(t, fusedisktest.OpenFile(t, path), fusedisk.Options{})
	refused := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
			t.Errorf("%s: %v, want EROFS or EACCES", what, err)
		}
	}
	for _, flag := range []int{os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND} {
		f, err := os.OpenFile(d.Path(), flag, 0)
		if err == nil {
			f.Close()
		}
		refused(fmt.Sprintf("open with flags %#x", flag), err)
	}
	refused("truncate", os.Truncate(d.Path(), 0))
	refused("chmod", os.Chmod(d.Path(), 0o644))
	refused("create", os.WriteFile(filepath.Join(filepath.Dir(d.Path()), "new"), nil, 0o644))
	refused("remove", os.Remove(d.Path()))
	fi, err := os.Stat(d.Path())
	if err != nil || fi.Size() != 8192 || fi.Mode() != 0o444 {
		t.Errorf("after the refused writes: %v, %v", fi, err)
	}
}

func TestBadName(t *testing.T) {
	for _, name := range []string{"a/b", "..", "."} {
		if _, err := fusedisk.Mount(t.TempDir(), failingSource{size: 1}, fusedisk.Options{Name: name}); err == nil ||
			!strings.Contains(err.Error(), "not a single path component") {
			t.Errorf("name %q: %v", name, err)
		}
	}
}

// isMountPoint tells whether dir is a mount point: on another device than
// its parent.
func isMountPoint(t *testing.T, dir string) bool {
	t.Helper()
	var st, parent unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatalf("stat %s: %v", dir, err)
	}
	if err := unix.Stat(filepath.Dir(dir), &parent); err != nil {
		t.Fatal(err)
	}
	return st.Dev != parent.Dev
}

// checkGone checks that dir is an empty directory and no mount point.
func checkGone(t *testing.T, dir string) {
	t.Helper()
	if isMountPoint(t, dir) {
		t.Errorf("%s is still a mount point", dir)
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Errorf("%s holds %v (%v), want nothing", dir, entries, err)
	}
}

// waited tells whether d.Wait returns within a few seconds.
func waited(d *fusedisk.Disk) bool {
	done := make(chan struct{})
	go func() { d.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(5 * time.Second):
		return false
	}
}

func TestUnmount(t *testing.T) {
	path, data := imageFile(t, 64<<10)
	src := fusedisktest.OpenFile(t, path)

	t.Run("idle", func(t *testing.T) {
		d := fusedisktest.Mount(t, src, fusedisk.Options{})
		dir := filepath.Dir(d.Path())
		if !isMountPoint(t, dir) {
			t.Fatalf("%s is no mount point after Mount", dir)
		}
		if err := d.Unmount(); err != nil {
			t.Fatal(err)
		}
		if !waited(d) {
			t.Error("Wait does not return after Unmount")
		}
		checkGone(t, dir)
		if err := d.Unmount(); err != nil {
			t.Errorf("a second Unmount: %v", err)
		}
	})

	// With the file open (a VMM still running), the mount leaves the
	// directory at once and the open file is served until it is closed.
	t.Run("busy", func(t *testing.T) {
		d := fusedisktest.Mount(t, src, fusedisk.Options{})
		dir := filepath.Dir(d.Path())
		f, err := os.Open(d.Path())
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := d.Unmount(); err != nil {
			t.Fatal(err)
		}
		checkGone(t, dir)
		got := make([]byte, len(data))
		if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
			t.Errorf("reading the open file after Unmount: %v", err)
		}
		f.Close()
		if !waited(d) {
			t.Error("Wait does not return once the open file is closed")
		}
	})

	t.Run("umount", func(t *testing.T) {
		d := fusedisktest.Mount(t, src, fusedisk.Options{})
		dir := filepath.Dir(d.Path())
		if err := unix.Unmount(dir, 0); err != nil {
			t.Fatal(err)
		}
		if !waited(d) {
			t.Error("Wait does not return after umount")
		}
		checkGone(t, dir)
	})
}

// TestDeadMount: a process killed while serving leaves a dead mount;
// the next Mount at the same directory clears it.
func TestDeadMount(t *testing.T) {
	if dir := os.Getenv("FUSEDISK_TEST_SERVE"); dir != "" {
		serveUntilKilled(dir)
		return
	}
	path, data := imageFile(t, 64<<10)
	dir := t.TempDir()
	// The probe mount skips the test where FUSE is unavailable.
	fusedisktest.Mount(t, fusedisktest.OpenFile(t, path), fusedisk.Options{})

	cmd := exec.Command(os.Args[0], "-test.run=^TestDeadMount$")
	cmd.Env = append(os.Environ(), "FUSEDISK_TEST_SERVE="+dir, "FUSEDISK_TEST_IMAGE="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 8)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "mounted\n" {
		cmd.Process.Kill()
		t.Fatalf("the serving process: %q, %v", line, err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := os.ReadDir(dir); !errors.Is(err, unix.ENOTCONN) {
		t.Fatalf("listing the killed process's mount: %v, want ENOTCONN", err)
	}

	d, err := fusedisk.Mount(dir, fusedisktest.OpenFile(t, path), fusedisk.Options{})
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		t.Fatal(err)
	}
	defer d.Unmount()
	if got, err := os.ReadFile(d.Path()); err != nil || !bytes.Equal(got, data) {
		t.Errorf("reading through the new mount: %v", err)
	}
	if err := d.Unmount(); err != nil {
		t.Fatal(err)
	}
	checkGone(t, dir)
}

// serveUntilKilled is TestDeadMount's serving process.
func serveUntilKilled(dir string) {
	f, err := os.Open(os.Getenv("FUSEDISK_TEST_IMAGE"))
	if err != nil {
		panic(err)
	}
	fi, err := f.Stat()
	if err != nil {
		panic(err)
	}
	if _, err := fusedisk.Mount(dir, fusedisktest.NewFile(f, fi.Size()), fusedisk.Options{}); err != nil {
		panic(err)
	}
	os.Stdout.WriteString("mounted\n")
	select {}
}

// holeySource is a file image whose zero 64 KiB blocks are holes.
type holeySource struct {
	*fusedisktest.File
	data []byte
}

const holeBlock = 64 << 10

func (s holeySource) next(off int64, hole bool) int64 {
	for b := max(off, 0) / holeBlock; b*holeBlock < int64(len(s.data)); b++ {
		blk := s.data[b*holeBlock : min((b+1)*holeBlock, int64(len(s.data)))]
		if isZero := !slices.ContainsFunc(blk, func(c byte) bool { return c != 0 }); isZero == hole {
			return max(off, b*holeBlock)
		}
	}
	return int64(len(s.data))
}

func (s holeySource) NextData(off int64) int64 { return s.next(off, false) }
func (s holeySource) NextHole(off int64) int64 { return s.next(off, true) }

// TestHoles: SEEK_DATA and SEEK_HOLE on the mounted file find a
// HoleSource's holes, its blocks count only data, and cp --sparse=always
// copies the same bytes.
func TestHoles(t *testing.T) {
	path, data := imageFile(t, oddSize)
	// Holes: the start, two blocks in the middle, and the end.
	for _, r := range [][2]int{{0, holeBlock}, {holeBlock * 10, holeBlock * 12}, {len(data) / holeBlock * holeBlock, len(data)}} {
		clear(data[r[0]:r[1]])
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	src := holeySource{File: fusedisktest.OpenFile(t, path), data: data}
	d := fusedisktest.Mount(t, src, fusedisk.Options{})
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	end := int64(len(data) / holeBlock * holeBlock)
	for _, c := range []struct {
		off    int64
		whence int
		want   int64 // -1: ENXIO
	}{
		{0, unix.SEEK_DATA, holeBlock},
		{0, unix.SEEK_HOLE, 0},
		{holeBlock + 5, unix.SEEK_DATA, holeBlock + 5},
		{holeBlock + 5, unix.SEEK_HOLE, 10 * holeBlock},
		{10*holeBlock + 7, unix.SEEK_DATA, 12 * holeBlock},
		{12 * holeBlock, unix.SEEK_HOLE, end},
		{end, unix.SEEK_DATA, -1},
		{end + 1, unix.SEEK_HOLE, end + 1},
		{int64(len(data)), unix.SEEK_DATA, -1},
	} {
		got, err := unix.Seek(int(f.Fd()), c.off, c.whence)
		if c.want < 0 {
			if !errors.Is(err, unix.ENXIO) {
				t.Errorf("seek(%d, %d) = %d, %v; want ENXIO", c.off, c.whence, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("seek(%d, %d) = %d, %v; want %d", c.off, c.whence, got, err, c.want)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if want := (end - 3*holeBlock + 511) / 512; st.Blocks != want {
		t.Errorf("st_blocks %d, want %d (the data only)", st.Blocks, want)
	}
	out := filepath.Join(t.TempDir(), "copy")
	if msg, err := exec.Command("cp", "--sparse=always", d.Path(), out).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, msg)
	}
	if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, data) {
		t.Errorf("cp --sparse=always of the mounted file: %v, same bytes %v", err, bytes.Equal(got, data))
	}
}
