package layer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// gzipCommand is the tool containerd inflates gzip with, and so kiln:
// igzip (ISA-L, about twice as fast as Go's reader), else unpigz, unless
// containerd's CONTAINERD_DISABLE_IGZIP or CONTAINERD_DISABLE_PIGZ turns
// it off; "" for Go's reader.
var gzipCommand = sync.OnceValue(func() string {
	for _, c := range []struct{ name, off string }{{"igzip", "CONTAINERD_DISABLE_IGZIP"}, {"unpigz", "CONTAINERD_DISABLE_PIGZ"}} {
		if off, _ := strconv.ParseBool(os.Getenv(c.off)); off {
			continue
		}
		if path, err := exec.LookPath(c.name); err == nil {
			return path
		}
	}
	return ""
})

// pipeSize is the buffer of the pipes to and from the command: with the
// kernel's 64 KiB, passing a 1 GiB layer through took a second more (3.4 s
// against 2.5 s on 2 CPUs), in context switches.
const pipeSize = 1 << 20

// gzipStream inflates in with the command at path. Read returns in's own
// error, if reading it failed, rather than the command's complaint about
// a stream that stopped; Close stops the command, and once it returns
// nothing reads in any more.
type gzipStream struct {
	path   string
	cmd    *exec.Cmd
	out    *os.File
	in     *os.File     // the command's stdin, which the copier writes
	stderr bytes.Buffer // a line or two, when it refuses the data

	mu      sync.Mutex // held by the copier while it reads the source
	stopped bool
	copied  chan struct{} // closed when the copier is done
	copyErr error         // the source's read error, set before copied is closed

	once sync.Once
	err  error // how the stream ended, once out gave EOF
}

func newGzipStream(path string, src io.Reader) (*gzipStream, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	for _, f := range []*os.File{inW, outW} {
		// Not through Fd, which would take the pipe out of the poller,
		// and Close would no longer end a Read.
		if rc, err := f.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) { unix.FcntlInt(fd, unix.F_SETPIPE_SZ, pipeSize) }) //nolint:errcheck // a smaller pipe is only slower
		}
	}
	g := &gzipStream{path: path, cmd: exec.Command(path, "-d", "-c"), out: outR, in: inW, copied: make(chan struct{})}
	g.cmd.Stdin, g.cmd.Stdout, g.cmd.Stderr = inR, outW, &g.stderr
	err = g.cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("starting %s: %w", path, err)
	}
	go g.copy(src)
	return g, nil
}

// copy feeds the command; a write fails once the command has stopped.
func (g *gzipStream) copy(src io.Reader) {
	defer close(g.copied)
	defer g.in.Close()
	buf := make([]byte, pipeSize)
	for {
		g.mu.Lock()
		if g.stopped {
			g.mu.Unlock()
			return
		}
		n, err := src.Read(buf)
		g.mu.Unlock()
		if n > 0 {
			if _, werr := g.in.Write(buf[:n]); werr != nil {
				return // the command ended: its exit says why
			}
		}
		if err != nil {
			if err != io.EOF {
				g.copyErr = err
			}
			return
		}
	}
}

func (g *gzipStream) Read(p []byte) (int, error) {
	n, err := g.out.Read(p)
	if err == io.EOF {
		g.once.Do(func() { g.err = g.wait() })
		if g.err != nil {
			return n, g.err
		}
	}
	return n, err
}

// wait reaps the command once its output ended and says whether the
// stream was whole.
func (g *gzipStream) wait() error {
	werr := g.cmd.Wait()
	<-g.copied
	if g.copyErr != nil {
		return g.copyErr // the source failed: what the command says follows from it
	}
	if werr != nil {
		err := fmt.Errorf("%s: %w: %s", filepath.Base(g.path), werr, strings.TrimSpace(g.stderr.String()))
		var exit *exec.ExitError
		if errors.As(werr, &exit) && exit.Exited() {
			return &corruptGzip{err} // it said no to the data
		}
		return err // killed, say by the OOM killer
	}
	return io.EOF
}

func (g *gzipStream) Close() error {
	g.once.Do(func() {
		g.cmd.Process.Kill() //nolint:errcheck // it may have exited
		g.err = errors.New("gzip stream closed")
		g.cmd.Wait() //nolint:errcheck // killed
	})
	g.out.Close()
	// A read of the source under way ends before this returns; none
	// starts after it.
	g.mu.Lock()
	g.stopped = true
	g.mu.Unlock()
	g.in.Close()
	return nil
}

// corruptGzip is an inflater's complaint about its input.
type corruptGzip struct{ err error }

func (c *corruptGzip) Error() string { return "gzip data truncated or corrupt: " + c.err.Error() }

func (c *corruptGzip) Unwrap() error { return c.err }
