package service

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/workdir"
)

// lockFile, in the root, is held (flock) by the kiln serving that root and
// holds its pid.
const lockFile = "serve.lock"

// openRoot creates the root if needed, checks that no other local user
// can change it, and locks it for this process: two kilns on one root
// would remove each other's work in progress. The kernel drops the lock
// when the process ends, however it ends, so the file a killed kiln
// leaves does not block the next start. Closing the file releases it.
func openRoot(root string) (*os.File, error) {
	if err := ensureDir("root", root, 0o700, true,
		"other users could change kiln's state; make it kiln's user's own and not writable by others, or choose another root"); err != nil {
		return nil, err
	}
	path := filepath.Join(root, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("root: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("root %s is in use by another kiln serve (%s, holding %s)", root, lockHolder(path), path)
		}
		return nil, fmt.Errorf("root: locking %s: %w", path, err)
	}
	if err = f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("root: %s: %w", path, err)
	}
	return f, nil
}

// lockHolder names the process a lock file records.
func lockHolder(path string) string {
	b, _ := os.ReadFile(path)
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
		return "pid " + strconv.Itoa(pid)
	}
	return "a process that has not yet written its pid"
}

// ensureDir creates dir (with perm) if it is missing, and refuses it
// when every local user may write to it or, when owned is set, when it
// is not the running user's: the error says what, and then advice.
func ensureDir(what, dir string, perm os.FileMode, owned bool, advice string) error {
	if err := os.MkdirAll(dir, perm); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	problem, err := workdir.Unsafe(dir, 0o002, owned)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if problem == "" {
		return nil
	}
	return fmt.Errorf("%s %s %s: %s", what, dir, problem, advice)
}

// listen opens kiln's unix socket at path with permission bits perm and,
// when gid is not -1, group gid. The socket's directory must not be
// world-writable. A stale socket (nothing answers on it) is replaced;
// one that a live process answers on is refused, naming the process.
func listen(path string, perm os.FileMode, gid int) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := ensureDir("socket directory", dir, 0o711, false,
		"other users could replace kiln's socket; choose an address in a directory only kiln's user may write, such as /run/kiln"); err != nil {
		return nil, err
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	// The socket is made with access for kiln's user only and opened up
	// afterwards, since a connection made before a chmod outlives it. The
	// umask is the process's: this runs before kiln starts other work.
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	if gid != -1 {
		err = os.Lchown(path, -1, gid)
	}
	if err == nil {
		err = os.Chmod(path, perm)
	}
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket: %w", err)
	}
	return ln, nil
}

// removeStaleSocket removes a socket nothing answers on any more (its
// server was killed). A socket a process answers on, or anything other
// than a socket, stays and is an error.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("socket %s: the path exists and is not a socket (mode %v); kiln leaves it alone", path, fi.Mode())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		defer c.Close()
		return fmt.Errorf("socket %s is in use by %s", path, peer(c.(*net.UnixConn)))
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s exists and kiln cannot tell whether it is in use: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("socket: removing a stale socket: %w", err)
	}
	return nil
}

// peer names the process at the other end of a unix connection.
func peer(c *net.UnixConn) string {
	raw, err := c.SyscallConn()
	if err != nil {
		return "another process"
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { //nolint:errcheck // cred stays nil
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cred == nil || err != nil {
		return "another process"
	}
	return fmt.Sprintf("another process (pid %d)", cred.Pid)
}

// lookupGroup reads a group name or number; empty is -1 (no change).
func lookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("config: socket_group: %w", err)
	}
	return strconv.Atoi(g.Gid)
}
