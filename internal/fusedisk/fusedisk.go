// Package fusedisk exposes one read-only disk image as a file in a FUSE
// mount, so that a VMM can open it as a root disk while the image's bytes
// come from elsewhere (a Source) only when they are read.
//
// The mount holds one regular file, mode 0444, with a fixed inode number,
// size and mtime (the Unix epoch): nothing about it varies, so the kernel
// keeps the pages it has read in its page cache and reads ahead in large
// requests. Reads are served concurrently, each bounded by a timeout: a
// read the Source does not finish in time, or one it fails, gives the
// reader EIO (and a log line with the offset and length) instead of a hang.
//
// As root the mount is made with mount(2) and needs no helper binary;
// otherwise go-fuse runs fusermount3 (or fusermount). Mount clears a dead
// mount left at its directory by a process that was killed while serving.
package fusedisk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Source is the disk image's content. It must not change while mounted.
type Source interface {
	Size() int64
	// ReadAt reads len(p) bytes at off (less only at the end of the
	// image), like io.ReaderAt. ctx ends when the read's timeout passes
	// or the request is interrupted.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// HoleSource is a Source that knows where its holes (runs of zeros it
// holds no data for) are. The file then answers SEEK_DATA and SEEK_HOLE
// and counts only data in its blocks, so that cp --sparse, qemu-img and
// a VMM's block status skip the holes without reading them.
type HoleSource interface {
	Source
	// NextData is the first offset from off on that is not in a hole,
	// or the size if there is none.
	NextData(off int64) int64
	// NextHole is the first offset from off on that is in a hole, or
	// the size if there is none (the end counts as one).
	NextHole(off int64) int64
}

// Options tune a mount. The zero value is ready to use.
type Options struct {
	// Name is the file's name in the mount; "" is "rootfs.ext4".
	Name string
	// Timeout bounds each read: one that takes longer fails with EIO and
	// its context is cancelled. 0 is 30s.
	Timeout time.Duration
	// AllowOther lets users other than the one mounting open the file
	// (a VMM running as another user). Without root, it needs
	// user_allow_other in /etc/fuse.conf.
	AllowOther bool
}

const (
	defaultName    = "rootfs.ext4"
	defaultTimeout = 30 * time.Second

	fileIno = 2 // the root directory is 1

	// maxRead is the largest read request asked of the kernel: 1 MiB, the
	// kernel's default limit (fs.fuse.max_pages_limit), two 512 KiB chunks.
	maxRead = 1 << 20
	// maxBackground bounds the readahead requests in flight; the kernel's
	// default (12) leaves fetches idle on a high-latency Source.
	maxBackground = 64
	// retryWindow is how long a range whose read failed fails at once.
	// After a failed readahead, the kernel reads the page the reader
	// waits for again, at once: failing that retry without asking the
	// Source keeps the reader's wait within one timeout.
	retryWindow = time.Second
	// cacheTimeout is how long the kernel trusts what it was told about
	// names and attributes: they never change.
	cacheTimeout = 24 * time.Hour
)

// ErrUnavailable is wrapped by Mount's error when this machine cannot make
// FUSE mounts at all (no /dev/fuse, or neither root nor fusermount).
var ErrUnavailable = errors.New("FUSE mounts are unavailable")

// Disk is a mounted disk image.
type Disk struct {
	dir    string
	path   string
	direct bool          // mounted with mount(2) as root, not by fusermount
	served chan struct{} // closed when the server has stopped

	mu       sync.Mutex
	detached bool
}

// Mount mounts a FUSE file system at dir (an existing directory) holding
// one file, opts.Name, with src's content, and serves it until the mount
// is unmounted. A dead mount left at dir by a killed process is cleared
// first.
func Mount(dir string, src Source, opts Options) (*Disk, error) {
	if opts.Name == "" {
		opts.Name = defaultName
	}
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	if opts.Name == "." || opts.Name == ".." || strings.ContainsAny(opts.Name, "/\x00") {
		return nil, fmt.Errorf("fusedisk: file name %q: not a single path component", opts.Name)
	}
	size := src.Size() // once: the file's size never changes
	if size < 0 {
		return nil, fmt.Errorf("fusedisk: negative image size %d", size)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	direct := os.Geteuid() == 0
	if err := checkAvailable(direct); err != nil {
		return nil, fmt.Errorf("fusedisk: mount at %s: %w", dir, err)
	}
	if err := clearDeadMount(dir, direct); err != nil {
		return nil, fmt.Errorf("fusedisk: mount at %s: %w", dir, err)
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("fusedisk: mount point: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("fusedisk: mount point %s is not a directory", dir)
	}

	root := &dirNode{file: &fileNode{src: src, size: size, data: dataBytes(src, size), timeout: opts.Timeout, path: filepath.Join(dir, opts.Name)}, name: opts.Name}
	ttl := cacheTimeout
	mo := fuse.MountOptions{
		AllowOther:    opts.AllowOther,
		FsName:        "kiln",
		Name:          "kiln",
		MaxWrite:      maxRead, // also max_read
		MaxReadAhead:  maxRead,
		MaxBackground: maxBackground,
		DisableXAttrs: true,
		// Replies are bytes in memory, nothing to splice from; a 1 MiB
		// reply would not fit the default pipe anyway.
		DisableSplice: true,
		// Requests are served in goroutines of their own, so a slow
		// chunk does not hold up reads of others; no locks are
		// forwarded (EnableLocks is off).
		SingleThreaded: false,
	}
	if direct {
		// Strict: a failed mount(2) is reported as such, not as a
		// missing fusermount.
		mo.DirectMountStrict = true
		mo.DirectMountFlags = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	} else {
		mo.Options = []string{"ro", "noexec"}
	}
	nodeFS := fs.NewNodeFS(root, &fs.Options{
		MountOptions:    mo,
		EntryTimeout:    &ttl,
		AttrTimeout:     &ttl,
		NegativeTimeout: &ttl,
		UID:             uint32(os.Geteuid()),
		GID:             uint32(os.Getegid()),
	})
	server, err := fuse.NewServer(nodeFS, dir, &mo)
	if err != nil {
		// go-fuse leaves the mount behind if the kernel's first request
		// fails; its server is gone, so it is a dead mount.
		clearDeadMount(dir, direct) //nolint:errcheck // reporting err
		return nil, fmt.Errorf("fusedisk: mount at %s: %w", dir, err)
	}
	m := &Disk{dir: dir, path: root.file.path, direct: direct, served: make(chan struct{})}
	go func() {
		server.Serve()
		close(m.served)
	}()
	if err := server.WaitMount(); err != nil {
		m.Unmount() //nolint:errcheck // reporting the mount's failure
		return nil, fmt.Errorf("fusedisk: mount at %s: %w", dir, err)
	}
	if direct {
		if err := raiseReadahead(dir); err != nil {
			log.L.WithError(err).WithField("dir", dir).Warn("reading ahead 128 KiB at a time only")
		}
	}
	return m, nil
}

// raiseReadahead lets the kernel read ahead as much as one request holds.
// A FUSE mount's backing device starts at 128 KiB whatever the mount asks
// for, and only root may raise it.
func raiseReadahead(dir string) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(p, []byte(strconv.Itoa(maxRead>>10)), 0)
}

// Path is the file: the mount's directory joined with Options.Name.
func (m *Disk) Path() string { return m.path }

// Unmount takes the mount away. When nothing has the file open, the mount
// is gone and the server stopped when Unmount returns. When something
// still has it open (a VMM still running), the mount is detached lazily
// (umount -l, fusermount -u -z): the directory is free and empty at once,
// the open file keeps being served until its last descriptor is closed,
// and Wait returns then. Unmount after the mount is gone does nothing.
//
// A process killed while serving cannot unmount: it leaves a dead mount
// whose reads fail with ENOTCONN until `umount -l` (or the next Mount at
// the same directory) clears it.
func (m *Disk) Unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.served:
		return nil
	default:
	}
	if m.detached {
		return nil
	}
	err := unmount(m.dir, m.direct, false)
	if errors.Is(err, unix.EBUSY) || (err != nil && !m.direct) {
		if lerr := unmount(m.dir, m.direct, true); lerr != nil {
			return fmt.Errorf("fusedisk: unmount %s: %w", m.dir, errors.Join(err, lerr))
		}
		m.detached = true
		log.L.WithField("path", m.path).Info("the disk is still open: detached its mount, serving it until it is closed")
		return nil
	}
	if err != nil {
		return fmt.Errorf("fusedisk: unmount %s: %w", m.dir, err)
	}
	<-m.served
	return nil
}

// Wait returns once the mount is gone (by Unmount, fusermount -u or
// umount) and its server has stopped.
func (m *Disk) Wait() { <-m.served }

// checkAvailable tells, before mounting, why a mount cannot be made here.
func checkAvailable(direct bool) error {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("%w: /dev/fuse: %w", ErrUnavailable, err)
	}
	if !direct {
		if _, err := fusermount(); err != nil {
			return fmt.Errorf("%w: not root, and %w", ErrUnavailable, err)
		}
	}
	return nil
}

// fusermount finds the helper that mounts FUSE without root.
func fusermount() (string, error) {
	for _, name := range []string{"fusermount3", "fusermount"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", errors.New("neither fusermount3 nor fusermount is in PATH")
}

// unmount unmounts dir, lazily (detaching it while it is busy) if lazy.
func unmount(dir string, direct, lazy bool) error {
	if direct {
		flags := 0
		if lazy {
			flags = unix.MNT_DETACH
		}
		return unix.Unmount(dir, flags)
	}
	bin, err := fusermount()
	if err != nil {
		return err
	}
	args := []string{"-u", dir}
	if lazy {
		args = []string{"-u", "-z", dir}
	}
	if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ClearDead detaches the dead mounts at dir (see clearDeadMount), as a
// process that mounted disks there and was killed leaves them.
func ClearDead(dir string) error { return clearDeadMount(dir, os.Geteuid() == 0) }

// clearDeadMount detaches the mounts at dir whose FUSE server is gone, as
// a killed process leaves them. statfs tells: the kernel always asks the
// server for it (stat may be answered from its cache) and fails it with
// ENOTCONN when the server is gone.
func clearDeadMount(dir string, direct bool) error {
	for range 8 { // mounts may be stacked; a few is plenty
		var st unix.Statfs_t
		err := unix.Statfs(dir, &st)
		if !errors.Is(err, unix.ENOTCONN) {
			return nil
		}
		log.L.WithField("dir", dir).Warn("clearing a dead FUSE mount left by a previous run")
		if err := unmount(dir, direct, true); err != nil {
			return fmt.Errorf("clearing a dead mount: %w", err)
		}
	}
	return fmt.Errorf("clearing dead mounts: %s still is one", dir)
}

// dirNode is the mount's root: a read-only directory holding the file.
type dirNode struct {
	fs.Inode
	file *fileNode
	name string
}

var (
	_ fs.NodeOnAdder   = (*dirNode)(nil)
	_ fs.NodeGetattrer = (*dirNode)(nil)
)

func (d *dirNode) OnAdd(ctx context.Context) {
	child := d.NewPersistentInode(ctx, d.file, fs.StableAttr{Mode: unix.S_IFREG, Ino: fileIno})
	d.AddChild(d.name, child, false)
}

func (d *dirNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = unix.S_IFDIR | 0o555
	out.Nlink = 2
	out.Ino = 1
	epochTimes(&out.Attr)
	return 0
}

// fileNode is the disk image.
type fileNode struct {
	fs.Inode
	src     Source
	size    int64
	data    int64 // bytes not in holes
	timeout time.Duration
	path    string

	mu     sync.Mutex
	failed []failedRange // reads that failed in the last retryWindow
}

// failedRange is a read that failed, and until when that is remembered.
type failedRange struct {
	off, end int64
	until    time.Time
}

// recentlyFailed tells whether a read overlapping [off, end) failed in
// the last retryWindow.
func (f *fileNode) recentlyFailed(off, end int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	f.failed = slices.DeleteFunc(f.failed, func(r failedRange) bool { return now.After(r.until) })
	return slices.ContainsFunc(f.failed, func(r failedRange) bool { return r.off < end && off < r.end })
}

func (f *fileNode) readFailed(off, end int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed = append(f.failed, failedRange{off, end, time.Now().Add(retryWindow)})
}

var (
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeLseeker   = (*fileNode)(nil)
)

// Lseek finds data and holes (the kernel asks only for SEEK_DATA and
// SEEK_HOLE); a Source that knows no holes is data throughout.
func (f *fileNode) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	if off >= uint64(f.size) {
		return 0, syscall.ENXIO
	}
	hs, holes := f.src.(HoleSource)
	switch whence {
	case unix.SEEK_DATA:
		if !holes {
			return off, 0
		}
		if d := hs.NextData(int64(off)); d < f.size {
			return uint64(d), 0
		}
		return 0, syscall.ENXIO
	case unix.SEEK_HOLE:
		if !holes {
			return uint64(f.size), 0
		}
		return uint64(min(hs.NextHole(int64(off)), f.size)), 0
	}
	return 0, syscall.EINVAL
}

// dataBytes counts the bytes of src that are not in holes.
func dataBytes(src Source, size int64) int64 {
	hs, ok := src.(HoleSource)
	if !ok {
		return size
	}
	var n int64
	for off := hs.NextData(0); off < size; {
		end := min(hs.NextHole(off), size)
		if end <= off {
			return size // a Source that contradicts itself: all data
		}
		n += end - off
		if end == size {
			break
		}
		next := hs.NextData(end)
		if next <= end {
			return size
		}
		off = next
	}
	return n
}

func (f *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = unix.S_IFREG | 0o444
	out.Nlink = 1
	out.Ino = fileIno
	out.Size = uint64(f.size)
	out.Blocks = uint64((f.data + 511) / 512)
	out.Blksize = 4096
	epochTimes(&out.Attr)
	return 0
}

// epochTimes sets every time of a to the Unix epoch, so that nothing
// about the file varies between mounts.
func epochTimes(a *fuse.Attr) {
	a.Atime, a.Mtime, a.Ctime = 0, 0, 0
	a.Atimensec, a.Mtimensec, a.Ctimensec = 0, 0, 0
}

func (f *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(unix.O_WRONLY|unix.O_RDWR|unix.O_TRUNC|unix.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	// The content never changes: the kernel may keep what it cached
	// across opens.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// readPool holds the buffers reads are served through: fresh memory
// for each request of a whole-image read costs a page fault a page.
var readPool = sync.Pool{New: func() any { return new([]byte) }}

// Read serves one read request from the Source, bounded by the timeout.
// The Source reads into a buffer of its own, so that one that outlives
// the timeout (ignoring its context) writes nowhere the server reuses;
// what it read is copied to dest.
func (f *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= f.size {
		return fuse.ReadResultData(nil), 0
	}
	n := int(min(int64(len(dest)), f.size-off))
	end := off + int64(n)
	l := log.L.WithFields(log.Fields{"path": f.path, "offset": off, "length": n})
	if f.recentlyFailed(off, end) {
		l.Debug("disk read overlaps one that just failed: the reader gets EIO")
		return nil, syscall.EIO
	}
	pooled := readPool.Get().(*[]byte)
	if cap(*pooled) < n {
		*pooled = make([]byte, max(n, maxRead))
	}
	buf := (*pooled)[:n]
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		n, err := f.src.ReadAt(ctx, buf, off)
		if n == len(buf) && errors.Is(err, io.EOF) {
			err = nil
		} else if err == nil && n < len(buf) {
			err = fmt.Errorf("short read: %d of %d bytes", n, len(buf))
		}
		done <- err
	}()
	var err error
	select {
	case err = <-done:
		// The Source is done with buf.
		if err == nil {
			n := copy(dest, buf)
			readPool.Put(pooled)
			return fuse.ReadResultData(dest[:n]), 0
		}
		readPool.Put(pooled)
	case <-ctx.Done():
		err = ctx.Err()
	}
	switch ctx.Err() {
	case context.Canceled:
		// The reader was interrupted (a signal): it is no longer waiting.
		l.WithError(err).Debug("disk read interrupted")
		return nil, syscall.EINTR
	case context.DeadlineExceeded:
		err = fmt.Errorf("no data after %v: %w", f.timeout, err)
	}
	f.readFailed(off, end)
	l.WithError(err).Error("disk read failed: the reader gets EIO")
	return nil, syscall.EIO
}
