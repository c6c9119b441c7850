package vmboot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"
)

const (
	// consolePoll is how often WaitForLine looks for new console output.
	// QEMU writes the log as the guest prints, so polling is simple and
	// fast enough next to a boot that takes seconds.
	consolePoll = 20 * time.Millisecond
	// tailLines and tailBytes bound the console excerpt put in errors.
	tailLines = 30
	tailBytes = 16 << 10
)

// WaitForLine waits until a line of the console log at path matches pattern
// and returns that line, without its line ending. It gives up when ctx ends
// or, if timeout is not zero, after timeout with an error wrapping
// ErrTimeout. The file need not exist yet. Lines are matched once complete,
// so pattern cannot see a line the guest has not finished.
func WaitForLine(ctx context.Context, path string, pattern *regexp.Regexp, timeout time.Duration) (string, error) {
	return waitForLine(ctx, path, pattern, timeout, nil)
}

// waitForLine is WaitForLine that also stops once exited is closed, after a
// last look at the complete log.
func waitForLine(ctx context.Context, path string, pattern *regexp.Regexp, timeout time.Duration, exited <-chan struct{}) (string, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, timeout, ErrTimeout)
		defer cancel()
	}
	r := &lineReader{path: path}
	defer r.close()
	tick := time.NewTicker(consolePoll)
	defer tick.Stop()

	for {
		// Look at exited before reading, so that the read after it has
		// closed sees everything the guest wrote.
		final := isClosed(exited)
		line, ok, err := r.find(pattern, final)
		if err != nil {
			return "", fmt.Errorf("reading console log: %w", err)
		}
		if ok {
			return line, nil
		}
		if final {
			return "", consoleError(path, fmt.Errorf("VM exited without printing a line matching %q", pattern))
		}
		select {
		case <-ctx.Done():
			return "", consoleError(path, fmt.Errorf("waiting for a console line matching %q: %w", pattern, context.Cause(ctx)))
		case <-exited:
		case <-tick.C:
		}
	}
}

func consoleError(path string, err error) error {
	return &Error{Err: err, ConsoleLog: path, ConsoleTail: tailFile(path)}
}

func isClosed(c <-chan struct{}) bool {
	if c == nil {
		return false
	}
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// lineReader reads a log file that another process is appending to.
type lineReader struct {
	path    string
	f       *os.File
	partial []byte // an unfinished last line
}

// find reads what was appended since the last call and returns the first
// new line matching pattern. With final set, an unfinished last line counts
// too, as nothing more will be written.
func (r *lineReader) find(pattern *regexp.Regexp, final bool) (string, bool, error) {
	if r.f == nil {
		f, err := os.Open(r.path)
		if errors.Is(err, os.ErrNotExist) {
			return "", false, nil
		}
		if err != nil {
			return "", false, err
		}
		r.f = f
	}
	data, err := io.ReadAll(r.f)
	if err != nil {
		return "", false, err
	}
	buf := append(r.partial, data...)
	for {
		i := bytes.IndexByte(buf, '\n')
		if i < 0 {
			break
		}
		line := string(bytes.TrimRight(buf[:i], "\r"))
		buf = buf[i+1:]
		if pattern.MatchString(line) {
			r.partial = append([]byte(nil), buf...)
			return line, true, nil
		}
	}
	r.partial = append(r.partial[:0:0], buf...)
	if final && len(r.partial) > 0 {
		if line := string(bytes.TrimRight(r.partial, "\r")); pattern.MatchString(line) {
			return line, true, nil
		}
	}
	return "", false, nil
}

func (r *lineReader) close() {
	if r.f != nil {
		r.f.Close()
	}
}

// readConsole returns the console log with serial line endings ("\r\n")
// turned into "\n".
func readConsole(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return normalizeNewlines(string(b)), nil
}

func normalizeNewlines(s string) string { return strings.ReplaceAll(s, "\r\n", "\n") }

// tailFile returns the last lines of the console log at path, or "" if
// there is nothing to show.
func tailFile(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > tailBytes {
		if _, err := f.Seek(-tailBytes, io.SeekEnd); err != nil {
			return ""
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return ""
	}
	return tail(normalizeNewlines(string(b)), tailLines)
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
