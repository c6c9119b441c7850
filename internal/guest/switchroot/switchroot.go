// Package switchroot is kiln-init's initramfs stage, for kernels that need
// modules before they can mount the root or compose an overlay root (a
// virtio-blk root, overlayfs built as a module). As the initramfs's /init it
// loads the modules listed in guest.InitramfsManifest in order, creates the
// device-mapper devices of dm-mod.create= that the kernel did not (see
// package dminit), waits for the root= device, mounts it as the kernel
// would have (rootfstype=, rootflags=, ro or rw), makes it the root and
// execs the init= program, /sbin/init by default: typically kiln-init
// again, now on the real root.
package switchroot

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
	"github.com/kilnfs/kiln/internal/guest/dminit"
)

// RootWait bounds how long the root device may take to appear.
const RootWait = 10 * time.Second

const (
	newRoot     = "/root" // where the real root is mounted before the switch
	defaultInit = "/sbin/init"
	pollPeriod  = 10 * time.Millisecond
)

// InInitramfs reports whether the calling process runs from the initramfs
// that kiln builds: its root is the kernel's RAM-backed rootfs and it holds
// the module manifest. A real root is never RAM-backed, so an image that
// happens to hold a file of that name does not confuse the two stages.
func InInitramfs() bool {
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return false
	}
	if st.Type != unix.RAMFS_MAGIC && st.Type != unix.TMPFS_MAGIC {
		return false
	}
	_, err := os.Stat(guest.InitramfsManifest)
	return err == nil
}

// Root is how the kernel command line says to mount the real root.
type Root struct {
	Device string // root=, a /dev path
	FSType string // rootfstype=, ext4 by default
	Flags  uintptr
	Data   string // rootflags=
	Init   string // init=, /sbin/init by default
}

// RootFromCmdline reads root=, rootfstype=, rootflags=, ro, rw and init=.
// Like the kernel it mounts the root read-only unless rw comes last.
func RootFromCmdline(c cmdline.Cmdline) (Root, error) {
	r := Root{
		Device: c.Get("root"),
		FSType: c.Get("rootfstype"),
		Data:   c.Get("rootflags"),
		Init:   c.Get("init"),
		Flags:  unix.MS_RDONLY,
	}
	switch {
	case r.Device == "":
		return Root{}, errors.New("no root= on the kernel command line")
	case !strings.HasPrefix(r.Device, "/dev/"):
		return Root{}, fmt.Errorf("root=%s: only /dev paths are supported", r.Device)
	}
	if r.FSType == "" {
		r.FSType = "ext4"
	}
	if r.Init == "" {
		r.Init = defaultInit
	}
	if !strings.HasPrefix(r.Init, "/") {
		return Root{}, fmt.Errorf("init=%s: not an absolute path", r.Init)
	}
	for _, p := range c.Params {
		switch {
		case p.Key == "ro" && !p.HasValue:
			r.Flags = unix.MS_RDONLY
		case p.Key == "rw" && !p.HasValue:
			r.Flags = 0
		}
	}
	return r, nil
}

// Run does the initramfs stage: it loads the modules, creates the
// device-mapper devices, mounts the real root, switches to it and execs its
// init with args. It returns only on failure, with /proc mounted so that
// the caller can power off. warnf reports what does not stop the boot.
func Run(args []string, warnf func(format string, args ...any)) error {
	for _, m := range []struct{ fstype, dir string }{{"proc", "/proc"}, {"devtmpfs", "/dev"}} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.fstype, m.dir, m.fstype, unix.MS_NOSUID, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.fstype, err)
		}
	}
	c, err := cmdline.Read()
	if err != nil {
		return err
	}
	root, err := RootFromCmdline(c)
	if err != nil {
		return err
	}
	mapped, err := dminit.FromCmdline(c)
	if err != nil {
		return err
	}
	if err := loadModules(guest.InitramfsManifest); err != nil {
		return err
	}
	if err := createMapped(mapped, warnf); err != nil {
		return err
	}
	if err := waitForDevice("root device", root.Device, RootWait); err != nil {
		return err
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(root.Device, newRoot, root.FSType, root.Flags, root.Data); err != nil {
		return fmt.Errorf("mount root %s (%s): %w", root.Device, root.FSType, err)
	}
	if err := switchRoot(); err != nil {
		return err
	}
	argv := append([]string{root.Init}, args...)
	err = unix.Exec(root.Init, argv, os.Environ())
	// The new root has no /proc yet; the caller needs it to power off.
	_ = os.MkdirAll("/proc", 0o555)
	_ = unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	return fmt.Errorf("start %s: %w", root.Init, err)
}

// loadModules loads the modules the manifest lists, in order. A module the
// kernel already has is fine.
func loadModules(manifest string) error {
	f, err := os.Open(manifest)
	if err != nil {
		return err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		name := strings.TrimSpace(s.Text())
		if name == "" {
			continue
		}
		if err := loadModule(name); err != nil {
			return err
		}
	}
	return s.Err()
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", path, err)
	}
	return nil
}

// createMapped creates the device-mapper devices once the block devices
// they are made of have appeared.
func createMapped(s dminit.Spec, warnf func(string, ...any)) error {
	for _, dev := range s.BlockDevices() {
		if err := waitForDevice("device", dev, RootWait); err != nil {
			return fmt.Errorf("%s: %w", dminit.ParamCreate, err)
		}
	}
	return s.Create(warnf)
}

// waitForDevice waits until the device node exists in /dev; what says
// what it is for an error.
func waitForDevice(what, dev string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(dev); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s %s did not appear within %s; block devices: %s",
				what, dev, timeout, blockDevices())
		}
		time.Sleep(pollPeriod)
	}
}

// blockDevices lists the kernel's block devices for an error message.
func blockDevices() string {
	data, err := os.ReadFile("/proc/partitions")
	if err != nil {
		return "unknown"
	}
	var names []string
	for _, line := range strings.Split(string(data), "\n")[1:] {
		if f := strings.Fields(line); len(f) == 4 {
			names = append(names, f[3])
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// switchRoot makes the root mounted on newRoot the root, as switch_root
// does: the initramfs's own files are deleted to free their memory, the
// mount is moved onto / and the process chroots into it.
func switchRoot() error {
	for _, dir := range []string{"/dev", "/proc"} {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		return err
	}
	removeTree("/", st.Dev)
	if err := unix.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the root onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// removeTree deletes what is below dir on the filesystem dev, and nothing
// on other filesystems, such as the real root mounted below it. Failures
// only cost memory.
func removeTree(dir string, dev uint64) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		// A mount point reports the device mounted on it.
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil || st.Dev != dev {
			continue
		}
		if e.IsDir() {
			removeTree(p, dev)
		}
		_ = os.Remove(p)
	}
}
