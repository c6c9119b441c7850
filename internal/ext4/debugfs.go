package ext4

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// script accumulates one batched debugfs command file.
//
// debugfs reads its script line by line and splits each line with the ss
// library's parser: whitespace separates words and double quotes group
// them, with "" standing for a literal quote inside a quoted word. Nothing
// else is special inside quotes, so quoting every name this way means a
// name can never end a word early or start another command. The one thing
// quoting cannot carry is a line break, which ends the line: such names are
// refused by quote rather than ever reaching debugfs. Lines stay short
// because names are always given relative to a directory's inode number,
// never as full paths.
type script struct {
	buf   bytes.Buffer
	lines int
}

func (s *script) printf(format string, args ...any) {
	fmt.Fprintf(&s.buf, format, args...)
	s.buf.WriteByte('\n')
	s.lines++
}

// quote returns a name as one debugfs word.
func quote(name string) (string, error) {
	if strings.ContainsAny(name, "\n\r\x00") {
		return "", fmt.Errorf("name %q contains a line break or NUL, which debugfs commands cannot carry", name)
	}
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`, nil
}

// setTime sets one of an inode's timestamps, seconds and nanoseconds, with
// the raw low and extra fields so that times before 1970 and after 2038
// survive exactly. have is what the inode holds now; fields that already
// match are left alone.
func (s *script) setTime(ino uint32, field string, t time.Time, have rawTime) {
	lo, extra := EncodeTime(t)
	if lo != have.lo {
		s.printf("sif <%d> %s_lo 0x%x", ino, field, lo)
	}
	if !have.hasExtra || extra != have.extra {
		s.printf("sif <%d> %s_hi 0x%x", ino, field, extra)
	}
}

// The times ext4 holds in a 256-byte inode: 32 signed bits of seconds
// extended by two epoch bits, from 1901-12-13T20:45:52Z to
// 2446-05-10T22:38:55Z. Old kernels wrote times before 1970 with
// both epoch bits set, which reads as 2310-04-04T16:10:40Z to
// 2378-04-22T19:24:47Z; e2fsck (when its clock is before 2242) takes
// every time in that range for such a mis-encoded date: -n reports
// "Timestamp(s) on inode N beyond 2310-04-04 are likely pre-1970", and
// -y or -p (the e2fsprogs writer's last step, a guest's boot-time check)
// turns it into one before 1970. So kiln stores no time in that range:
// it stores 2310-04-04T16:10:39Z (gapLow) instead, the latest time
// before it, as earlier kiln did for every time from 2310 on. Times
// outside ext4's range are clamped to its ends, nanoseconds dropped, as
// the kernel does.
var (
	minTime = int64(-1 << 31)
	gapLow  = int64(3<<32 - 1<<31 - 1)
	gapHigh = int64(3 << 32)
	maxTime = int64(3<<32 + 1<<31 - 1)
)

// EncodeTime splits a time into ext4's on-disk seconds field and extra
// field (nanoseconds << 2 | epoch bits), kept to the times ext4 and
// e2fsck agree on (see minTime).
func EncodeTime(t time.Time) (lo, extra uint32) {
	sec, nsec := t.Unix(), int64(t.Nanosecond())
	switch {
	case sec < minTime:
		sec, nsec = minTime, 0
	case sec > gapLow && sec < gapHigh:
		sec, nsec = gapLow, 0
	case sec > maxTime:
		sec, nsec = maxTime, 0
	}
	lo = uint32(sec)
	epoch := (sec - int64(int32(lo))) >> 32
	return lo, uint32(nsec)<<2 | uint32(epoch&3)
}

// debugfs runs a script against an image and fails if any command in it
// failed: debugfs itself exits 0 regardless, and reports command errors on
// stderr.
func debugfs(ctx context.Context, image, workDir string, s *script, env []string) (stdout []byte, err error) {
	return debugfsOn(ctx, image, nil, workDir, s, env)
}

// debugfsOn is debugfs for an image given by name, or as an open file
// (passed to debugfs as its descriptor 3) when file is set.
func debugfsOn(ctx context.Context, image string, file *os.File, workDir string, s *script, env []string) (stdout []byte, err error) {
	f, err := os.CreateTemp(workDir, "debugfs-*.txt")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(s.buf.Bytes()); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	if file != nil {
		image = "/proc/self/fd/3"
	}
	cmd := tool(ctx, "debugfs", "-w", "-f", f.Name(), image)
	cmd.Env = env
	if file != nil {
		cmd.ExtraFiles = []*os.File{file}
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("debugfs: %w: %s", err, strings.TrimSpace(errb.String()))
	}
	if msg := debugfsErrors(errb.Bytes()); msg != "" {
		if strings.Contains(msg, "Could not allocate block") {
			return nil, fmt.Errorf("%w: debugfs: %s", ErrNoSpace, msg)
		}
		return nil, fmt.Errorf("debugfs: %s", msg)
	}
	return out.Bytes(), nil
}

// debugfsErrors returns the error lines of debugfs's stderr: everything but
// its version banner.
func debugfsErrors(stderr []byte) string {
	var errs []string
	sc := bufio.NewScanner(bytes.NewReader(stderr))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
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

// allocatedInodes parses the inode numbers debugfs reports for mknod, in
// command order.
func allocatedInodes(stdout []byte) ([]uint32, error) {
	var out []uint32
	sc := bufio.NewScanner(bytes.NewReader(stdout))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Allocated inode: ")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(rest), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("debugfs: unexpected output %q", sc.Text())
		}
		out = append(out, uint32(n))
	}
	return out, sc.Err()
}
