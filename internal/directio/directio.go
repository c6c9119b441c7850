// Package directio writes large runs of a file around the page cache
// (O_DIRECT), several at a time, for an output kiln writes once and does
// not read back, such as a downloaded image a VM will boot. Buffered,
// each byte would first be copied into a newly allocated page-cache
// page, which costs the CPU that decompressing and hashing the same
// stream need; written direct, the device reads it from the writer's own
// buffer.
//
// Where direct I/O is refused (a file system without it, a run that is
// not block-aligned), a run is written through the page cache instead.
// A caller that needs the file durable still syncs it: O_DIRECT makes no
// promise about the metadata.
package directio

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the alignment of the offset, length and memory of a run
// written direct; anything else goes through the page cache.
const Align = 4096

const directFlag = unix.O_DIRECT

// Writer writes runs of one file, up to a fixed number at a time.
type Writer struct {
	f      *os.File // buffered, as the caller opened it
	direct *os.File // the same file opened with O_DIRECT; nil if refused
	jobs   chan job
	wg     sync.WaitGroup
	closed sync.Once

	mu       sync.Mutex
	err      error
	refused  bool // direct I/O was refused: every run goes through f
	buffered bool // some run went through the page cache
}

type job struct {
	p    []byte
	off  int64
	done func()
}

// New starts a Writer of f with inflight runs at a time, written direct
// if direct is set (and the file system allows it), else through the
// page cache: a caller that reads the file back at once wants it there.
// f must be open for writing; it stays the caller's.
func New(f *os.File, inflight int, direct bool) *Writer {
	w := &Writer{f: f, jobs: make(chan job)}
	// A second open file description: O_DIRECT on f itself would change
	// how the caller's own reads and writes of f behave. It is opened
	// only where f itself may write anywhere in the file: reopening
	// checks the file's permissions, not how f was opened.
	if direct && writable(f) {
		if d, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), os.O_WRONLY|directFlag, 0); err == nil {
			w.direct = d
		}
	}
	for range max(inflight, 1) {
		w.wg.Add(1)
		go w.work()
	}
	return w
}

func (w *Writer) work() {
	defer w.wg.Done()
	for j := range w.jobs {
		if w.failed() == nil {
			if err := w.write(j.p, j.off); err != nil {
				w.fail(err)
			}
		}
		if j.done != nil {
			j.done()
		}
	}
}

// WriteAt queues p to be written at off and returns once a writer has
// taken it; done (if not nil) is called once p is written or given up,
// and p must not change until then. It returns the first error of an
// earlier run, after which runs are no longer written.
func (w *Writer) WriteAt(p []byte, off int64, done func()) error {
	if err := w.failed(); err != nil {
		if done != nil {
			done()
		}
		return err
	}
	w.jobs <- job{p: p, off: off, done: done}
	return nil
}

// Close waits for the queued runs and returns the first error of any.
// WriteAt must not be called after; Close may be, again.
func (w *Writer) Close() error {
	w.closed.Do(func() {
		close(w.jobs)
		w.wg.Wait()
		if w.direct != nil {
			w.direct.Close()
		}
	})
	return w.failed()
}

// Direct says whether every run so far was written with O_DIRECT. (A
// file system may accept O_DIRECT and still go through its cache, as
// tmpfs does.)
func (w *Writer) Direct() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.direct != nil && !w.buffered
}

func (w *Writer) write(p []byte, off int64) error {
	w.mu.Lock()
	direct := w.direct != nil && !w.refused && aligned(p, off)
	w.buffered = w.buffered || !direct
	w.mu.Unlock()
	if direct {
		_, err := w.direct.WriteAt(p, off)
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		// Refused after all (a device whose sectors are larger than
		// Align): this run and every later one through the page cache.
		w.mu.Lock()
		w.refused, w.buffered = true, true
		w.mu.Unlock()
	}
	_, err := w.f.WriteAt(p, off)
	return err
}

// writable says whether f was opened for writing, not for appending.
func writable(f *os.File) bool {
	flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return false
	}
	mode := flags & unix.O_ACCMODE
	return (mode == unix.O_WRONLY || mode == unix.O_RDWR) && flags&unix.O_APPEND == 0
}

func aligned(p []byte, off int64) bool {
	return len(p) > 0 && off%Align == 0 && len(p)%Align == 0 && uintptr(unsafe.Pointer(&p[0]))%Align == 0
}

func (w *Writer) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *Writer) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.err = err
	}
}

// Buffer returns a buffer of n bytes whose memory is Align-aligned, as
// a run written direct needs.
func Buffer(n int) []byte {
	b := make([]byte, n+Align)
	skip := (Align - int(uintptr(unsafe.Pointer(&b[0]))%Align)) % Align
	return b[skip : skip+n : skip+n]
}

// WriteFile writes p to the file name, created or truncated, around the
// page cache where it can: the Align-multiple head of p direct when p's
// memory is aligned, anything else (a short tail, a buffer that is not
// aligned, a file system that refuses O_DIRECT) through the page cache.
// For a cache file written once and read back rarely, whose bytes the
// caller keeps in memory meanwhile.
func WriteFile(name string, p []byte, perm os.FileMode) error {
	head := p[:len(p)/Align*Align]
	if !aligned(head, 0) {
		return os.WriteFile(name, p, perm)
	}
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|directFlag, perm)
	if errors.Is(err, unix.EINVAL) {
		return os.WriteFile(name, p, perm)
	}
	if err != nil {
		return err
	}
	_, err = f.Write(head)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, unix.EINVAL) {
		return os.WriteFile(name, p, perm)
	}
	if err != nil || len(head) == len(p) {
		return err
	}
	f, err = os.OpenFile(name, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(p[len(head):], int64(len(head)))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
