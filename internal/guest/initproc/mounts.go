// Package initproc holds what kiln-init does as PID 1: mounting the kernel's
// API filesystems, starting and supervising the workload, reaping orphans,
// forwarding signals and tidying up before the machine powers off.
package initproc

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one filesystem to mount at boot.
type Mount struct {
	Source, Target, FSType string
	Flags                  uintptr
	Data                   string
	// Optional mounts fail quietly when the kernel lacks the filesystem.
	Optional bool
}

const nosuidNodev = unix.MS_NOSUID | unix.MS_NODEV

// ProcMount and SysMount come first among APIMounts: kiln-init reads the
// kernel command line from /proc before anything else, and powering off
// needs both.
var (
	ProcMount = Mount{Source: "proc", Target: "/proc", FSType: "proc", Flags: nosuidNodev | unix.MS_NOEXEC}
	SysMount  = Mount{Source: "sysfs", Target: "/sys", FSType: "sysfs", Flags: nosuidNodev | unix.MS_NOEXEC}
)

// APIMounts are the filesystems every workload expects, in mount order.
// devtmpfs takes no options: the kernel may already share its single
// instance with other mounts.
var APIMounts = []Mount{
	ProcMount,
	SysMount,
	{Source: "devtmpfs", Target: "/dev", FSType: "devtmpfs", Flags: unix.MS_NOSUID},
	{Source: "devpts", Target: "/dev/pts", FSType: "devpts", Flags: unix.MS_NOSUID | unix.MS_NOEXEC,
		Data: "gid=5,mode=0620,ptmxmode=0666"},
	{Source: "shm", Target: "/dev/shm", FSType: "tmpfs", Flags: nosuidNodev, Data: "mode=1777"},
	{Source: "tmpfs", Target: "/run", FSType: "tmpfs", Flags: nosuidNodev, Data: "mode=0755"},
	{Source: "tmpfs", Target: "/tmp", FSType: "tmpfs", Flags: nosuidNodev, Data: "mode=1777"},
	{Source: "cgroup2", Target: "/sys/fs/cgroup", FSType: "cgroup2", Flags: nosuidNodev | unix.MS_NOEXEC,
		Optional: true},
}

// devSymlinks are the /dev entries devtmpfs does not create.
var devSymlinks = [][2]string{
	{"/proc/self/fd", "/dev/fd"},
	{"/proc/self/fd/0", "/dev/stdin"},
	{"/proc/self/fd/1", "/dev/stdout"},
	{"/proc/self/fd/2", "/dev/stderr"},
}

// MountAPIFilesystems mounts mounts below root, as Mounts does, and adds the
// /dev symlinks devtmpfs lacks.
func MountAPIFilesystems(root string, mounts []Mount, warnf func(string, ...any)) {
	Mounts(root, mounts, warnf)
	for _, l := range devSymlinks {
		link := filepath.Join(root, l[1])
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(l[0], link); err != nil && !errors.Is(err, fs.ErrExist) {
			warnf("create %s: %v", l[1], err)
		}
	}
}

// Mounts mounts mounts below root, skipping those already mounted (the
// kernel mounts /dev itself with CONFIG_DEVTMPFS_MOUNT). It never fails:
// problems, such as a mount point that cannot be created on a read-only
// root, are warnings passed to warnf, and the mount is skipped.
func Mounts(root string, mounts []Mount, warnf func(string, ...any)) {
	logf := warnf
	var mounted map[string]bool
	for _, m := range mounts {
		target := filepath.Join(root, m.Target)
		if mounted == nil {
			// /proc/self/mountinfo exists once /proc is mounted.
			mounted = mountPoints()
		}
		if mounted[target] {
			continue
		}
		if err := os.MkdirAll(target, 0o755); err != nil {
			switch {
			case m.Optional:
			case errors.Is(err, unix.EROFS):
				logf("cannot create mount point %s on the read-only root; %s is not mounted", m.Target, m.FSType)
			default:
				logf("cannot create mount point %s: %v", m.Target, err)
			}
			continue
		}
		err := unix.Mount(m.Source, target, m.FSType, m.Flags, m.Data)
		switch {
		case err == nil:
			mounted = nil // refresh on the next iteration
		case errors.Is(err, unix.EBUSY):
			// Already mounted, which mountinfo could not tell us yet.
		case m.Optional && errors.Is(err, unix.ENODEV):
		default:
			logf("mount %s on %s: %v", m.FSType, m.Target, err)
		}
	}
}

// mountPoints returns the mount points listed in /proc/self/mountinfo, or an
// empty set before /proc is mounted.
func mountPoints() map[string]bool {
	points := map[string]bool{}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return points
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// Field 5 is the mount point, with spaces and the like escaped
		// in octal.
		fields := strings.Fields(s.Text())
		if len(fields) > 4 {
			points[unescapeOctal(fields[4])] = true
		}
	}
	return points
}

func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// RemountRootReadOnly remounts / read-only so the filesystem is clean when
// the machine stops. Failures are reported, not fatal: the journal copes.
func RemountRootReadOnly() error {
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("remount / read-only: %w", err)
	}
	return nil
}
