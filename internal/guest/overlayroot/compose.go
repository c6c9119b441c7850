package overlayroot

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
)

// DefaultWait is how long Compose waits for a scratch disk named on the
// command line to appear.
const DefaultWait = 5 * time.Second

const pollInterval = 25 * time.Millisecond

// Options configure Compose.
type Options struct {
	Spec Spec
	// Dir is a directory of the current root on which Compose mounts a
	// tmpfs for its own mount points; kiln-init uses guest.Dir, which
	// exists on every image it boots. What is below it stays hidden until
	// the new root replaces the current one.
	Dir string
	// Wait bounds how long Compose waits for the disk that Spec names;
	// zero means DefaultWait. A discovered disk is not waited for.
	Wait time.Duration
}

// Root is the overlay root that Compose set up.
type Root struct {
	// Lower and Scratch are the image's and the scratch disk's devices,
	// e.g. /dev/nvme0n1 and /dev/nvme1n1.
	Lower, Scratch string
	// scratchRoot holds the scratch filesystem, which no path reaches
	// once the old root is gone, for Close.
	scratchRoot *os.File
}

func (r *Root) String() string {
	return fmt.Sprintf("an overlay of %s (read-only) and %s (scratch)", r.Lower, r.Scratch)
}

// Compose makes an overlay of the current root and the scratch disk the
// root of the calling process, which must be PID 1 before it starts any
// other process, and returns it. It returns nil and no error when there is
// nothing to do: Spec is off, or no scratch disk was discovered.
//
// The current root becomes the overlay's read-only lower layer and, like
// the scratch filesystem and the mounts Compose uses on the way (a tmpfs on
// Dir with a private sysfs and devtmpfs), is no longer reachable by path
// afterwards. On error the current root is left as it was.
func Compose(opts Options) (*Root, error) {
	if opts.Spec.Off {
		return nil, nil
	}
	if opts.Wait == 0 {
		opts.Wait = DefaultWait
	}
	var lower unix.Stat_t
	if err := unix.Stat("/", &lower); err != nil {
		return nil, fmt.Errorf("stat /: %w", err)
	}
	// pivot_root refuses shared mounts, and nothing here should propagate.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return nil, fmt.Errorf("make / private: %w", err)
	}

	if err := unix.Mount("tmpfs", opts.Dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700"); err != nil {
		return nil, fmt.Errorf("mount a tmpfs on %s: %w", opts.Dir, err)
	}
	root, err := compose(opts, lower)
	if root == nil {
		// Detach the tmpfs with everything mounted below it.
		if uerr := unix.Unmount(opts.Dir, unix.MNT_DETACH); uerr != nil && err == nil {
			err = fmt.Errorf("unmount %s: %w", opts.Dir, uerr)
		}
	}
	return root, err
}

// compose does Compose's work below the tmpfs on opts.Dir. It returns a
// Root once the new root is in place, even with an error.
func compose(opts Options, lower unix.Stat_t) (*Root, error) {
	var (
		sys      = filepath.Join(opts.Dir, "sys")
		dev      = filepath.Join(opts.Dir, "dev")
		scratch  = filepath.Join(opts.Dir, "scratch")
		lowerDir = filepath.Join(opts.Dir, "lower")
		newRoot  = filepath.Join(opts.Dir, "root")
	)
	for _, d := range []string{sys, dev, scratch, lowerDir, newRoot} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return nil, err
		}
	}
	if err := unix.Mount("sysfs", sys, "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return nil, fmt.Errorf("mount sysfs: %w", err)
	}
	if err := unix.Mount("devtmpfs", dev, "devtmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
		return nil, fmt.Errorf("mount devtmpfs: %w", err)
	}

	disk, err := waitForScratch(opts, sys, dev, lower.Dev)
	if err != nil || disk.name == "" {
		return nil, err
	}
	devs, _ := blockDevices(sys)
	r := &Root{Lower: deviceName(devs, lower.Dev), Scratch: disk.path()}
	if r.Lower == "" {
		r.Lower = "the image"
	}

	if err := mountScratch(disk, sys, dev, scratch); err != nil {
		return nil, err
	}
	upper, work, err := prepareLayers(scratch, lower)
	if err != nil {
		return nil, fmt.Errorf("scratch disk %s: %w", r.Scratch, err)
	}
	// A read-only bind of the root alone, without what is mounted below
	// it (this tmpfs among others), is the lower layer.
	if err := unix.Mount("/", lowerDir, "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind the root: %w", err)
	}
	if err := unix.Mount("", lowerDir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return nil, fmt.Errorf("make the lower layer read-only: %w", err)
	}
	data := "lowerdir=" + lowerDir + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", newRoot, "overlay", 0, data); err != nil {
		if errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("mount overlay: %w (the kernel lacks overlayfs; load overlay.ko from an initramfs)", err)
		}
		return nil, fmt.Errorf("mount overlay: %w", err)
	}
	fd, err := unix.Open(scratch, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open scratch filesystem: %w", err)
	}
	r.scratchRoot = os.NewFile(uintptr(fd), scratch)

	if err := pivot(newRoot); err != nil {
		var pe *pivotError
		if errors.As(err, &pe) && pe.pivoted {
			return r, err
		}
		r.scratchRoot.Close()
		return nil, err
	}
	return r, nil
}

// waitForScratch finds the scratch disk, waiting up to opts.Wait for one
// that the Spec names. A zero blockDevice means none was discovered.
func waitForScratch(opts Options, sys, dev string, rootDev uint64) (blockDevice, error) {
	deadline := time.Now().Add(opts.Wait)
	for {
		d, err := locate(opts.Spec, sys, dev, rootDev)
		switch {
		case err == nil:
			return d, nil
		case !errors.Is(err, errNotFound):
			return blockDevice{}, fmt.Errorf("scratch disk: %w", err)
		case !opts.Spec.Named():
			return blockDevice{}, nil
		case time.Now().After(deadline):
			return blockDevice{}, fmt.Errorf("scratch disk %s did not appear within %s", opts.Spec, opts.Wait)
		}
		time.Sleep(pollInterval)
	}
}

// mountScratch mounts the scratch disk's ext4 filesystem read-write on
// dir. It holds the container's own files, setuid programs and device
// nodes included, so it is mounted without restrictions.
func mountScratch(disk blockDevice, sys, dev, dir string) error {
	node := filepath.Join(dev, disk.name)
	_, ok, err := readDeviceLabel(node)
	if err != nil {
		return fmt.Errorf("scratch disk %s: %w", disk.path(), err)
	}
	if !ok {
		return fmt.Errorf("scratch disk %s holds no ext4 filesystem (make one with mkfs.ext4 -L %s)",
			disk.path(), guest.ScratchLabel)
	}
	ro, _ := os.ReadFile(filepath.Join(sys, "class", "block", strings.ReplaceAll(disk.name, "/", "!"), "ro"))
	if strings.TrimSpace(string(ro)) == "1" {
		return fmt.Errorf("scratch disk %s is read-only", disk.path())
	}
	if err := unix.Mount(node, dir, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount scratch disk %s: %w", disk.path(), err)
	}
	return nil
}

// prepareLayers creates the upper and work directories on the scratch
// filesystem mounted at dir when missing. A new upper directory is the root
// directory of the overlay, so it gets the image root's mode and owner.
func prepareLayers(dir string, lower unix.Stat_t) (upper, work string, err error) {
	upper = filepath.Join(dir, guest.ScratchUpper)
	work = filepath.Join(dir, guest.ScratchWork)
	switch err := os.Mkdir(upper, 0o755); {
	case err == nil:
		if err := unix.Chmod(upper, lower.Mode&0o7777); err != nil {
			return "", "", err
		}
		if err := unix.Lchown(upper, int(lower.Uid), int(lower.Gid)); err != nil {
			return "", "", err
		}
	case !errors.Is(err, fs.ErrExist):
		return "", "", err
	}
	if err := os.Mkdir(work, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", "", err
	}
	for _, d := range []string{upper, work} {
		fi, err := os.Stat(d)
		if err != nil {
			return "", "", err
		}
		if !fi.IsDir() {
			return "", "", fmt.Errorf("/%s is not a directory", filepath.Base(d))
		}
	}
	return upper, work, nil
}

// pivotError is a failed pivot; pivoted tells whether the new root was
// already in place.
type pivotError struct {
	err     error
	pivoted bool
}

func (e *pivotError) Error() string { return e.err.Error() }
func (e *pivotError) Unwrap() error { return e.err }

// pivot makes newRoot, a mount point, the root and lets go of the old root
// and everything mounted below it.
func pivot(newRoot string) error {
	oldRoot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &pivotError{err: fmt.Errorf("open /: %w", err)}
	}
	defer unix.Close(oldRoot)
	if err := unix.Chdir(newRoot); err != nil {
		return &pivotError{err: err}
	}
	// With both arguments ".", the old root ends up stacked on top of the
	// new one, which needs no directory to park it in.
	if err := unix.PivotRoot(".", "."); err != nil {
		_ = unix.Chdir("/")
		return &pivotError{err: fmt.Errorf("pivot_root: %w", err)}
	}
	// "." may still be the new root below the old one; the descriptor
	// surely is the old root.
	if err := unix.Fchdir(oldRoot); err != nil {
		return &pivotError{err: fmt.Errorf("enter the old root: %w", err), pivoted: true}
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return &pivotError{err: fmt.Errorf("detach the old root: %w", err), pivoted: true}
	}
	if err := unix.Chdir("/"); err != nil {
		return &pivotError{err: err, pivoted: true}
	}
	return nil
}

// Close remounts the scratch filesystem read-only, which writes its journal
// out, so that the host finds it clean. Call it at shutdown, once no process
// writes any more and / is read-only. A nil Root has nothing to close.
func (r *Root) Close() error {
	if r == nil || r.scratchRoot == nil {
		return nil
	}
	defer r.scratchRoot.Close()
	// No path leads to the scratch mount, so mount(2) cannot remount it;
	// fspick reconfigures its superblock through a descriptor instead.
	fd, err := unix.Fspick(int(r.scratchRoot.Fd()), "", unix.FSPICK_EMPTY_PATH|unix.FSPICK_CLOEXEC)
	if err == nil {
		defer unix.Close(fd)
		if err = unix.FsconfigSetFlag(fd, "ro"); err == nil {
			err = unix.FsconfigReconfigure(fd)
		}
	}
	if err != nil {
		return fmt.Errorf("remount scratch disk %s read-only: %w", r.Scratch, err)
	}
	return nil
}
