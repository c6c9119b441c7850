package vmboot

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// Defaults for the zero values of Config fields.
const (
	DefaultQEMU      = "qemu-system-x86_64"
	DefaultMemoryMiB = 512
	DefaultCPUs      = 1
	DefaultAccel     = AccelTCG
)

// Accelerators accepted in Config.Accel.
const (
	// AccelTCG emulates the CPU. It is slower but works on every host,
	// including those whose /dev/kvm cannot run a full Linux guest.
	AccelTCG = "tcg"
	// AccelKVM uses hardware virtualisation through /dev/kvm.
	AccelKVM = "kvm"
)

// GuestAgentDevice is the guest device wired to Config.AgentSocket. It is a
// 16550A UART at I/O port 0x2f8; the cloud kernel's built-in 8250 driver
// binds it, so no module is needed. An agent should open it once and put it
// in raw mode without echo (stty raw -echo): bytes that arrive while the
// device is closed are lost, and the default tty settings echo input back to
// the host and turn "\n" into "\r\n".
const GuestAgentDevice = "/dev/ttyS1"

// Config describes one VM.
type Config struct {
	// Kernel is the path of the kernel image (vmlinuz). Required.
	Kernel string
	// Rootfs is the path of the ext4 image the guest mounts as /. Required.
	Rootfs string
	// ReadOnly attaches Rootfs read-only and mounts it ro, so neither QEMU
	// nor the guest can change it. Set it for images you want to keep
	// intact; otherwise the image is attached and mounted read-write.
	ReadOnly bool
	// Disks are attached after Rootfs as further NVMe disks, which the
	// guest sees in order as /dev/nvme1n1, /dev/nvme2n1, ... (see
	// DiskDevice).
	Disks []Disk
	// Modules names kernel modules the guest needs before its root is
	// mounted, e.g. "overlay" for an overlay root. Those the kernel has
	// built in are dropped; for the others Start builds an initramfs that
	// loads them, with their dependencies, and then mounts the root as the
	// kernel would. Kernel must then be an unpacked kernel package
	// (boot/vmlinuz-RELEASE next to lib/modules/RELEASE), as package kernel
	// provides.
	Modules []string
	// Initramfs boots through kiln-init's initramfs even when the kernel
	// has all of Modules built in, for what kiln-init does there before
	// the root is mounted: creating the devices of dm-mod.create= on a
	// kernel without CONFIG_DM_INIT (it leaves those the kernel created).
	// Kernel must then be an unpacked kernel package, as for Modules.
	Initramfs bool
	// InitramfsInit is the host path of the kiln-init binary that the
	// initramfs runs as /init. Empty means the one kiln --inject would
	// use: next to the running executable, in $PATH or in
	// /usr/libexec/kiln.
	InitramfsInit string
	// Init is the guest path of the first process (init=). Empty means the
	// kernel's default search (/sbin/init, /etc/init, /bin/init, /bin/sh).
	Init string
	// Append holds extra kernel parameters, e.g. "loglevel=4".
	Append []string
	// InitArgs are passed to init as its arguments, after "--" on the kernel
	// command line.
	InitArgs []string
	// MemoryMiB is the guest memory size; 0 means DefaultMemoryMiB.
	MemoryMiB int
	// CPUs is the number of guest CPUs; 0 means DefaultCPUs.
	CPUs int
	// Accel is AccelTCG or AccelKVM; empty means DefaultAccel.
	Accel string
	// ConsoleLog is the file the guest console (ttyS0) is written to. It is
	// truncated when the VM starts. Required.
	ConsoleLog string
	// AgentSocket, if set, is the path of a unix socket that QEMU listens
	// on and connects to the guest's second serial port (GuestAgentDevice).
	// QEMU does not start the guest until a client has connected (see
	// VM.DialAgent), so nothing the guest writes early is lost. QEMU serves
	// one connection at a time.
	AgentSocket string
	// Timeout bounds the VM's lifetime; when it passes the VM is killed and
	// Wait reports ErrTimeout. Zero means no limit other than the context.
	Timeout time.Duration
	// QEMU is the QEMU binary, looked up in PATH if it has no slash; empty
	// means DefaultQEMU.
	QEMU string
}

// Disk is a disk image attached besides the root.
type Disk struct {
	Path string
	// ReadOnly attaches it read-only.
	ReadOnly bool
}

// DiskDevice returns the guest device of Config.Disks[i].
func DiskDevice(i int) string { return fmt.Sprintf("/dev/nvme%dn1", i+1) }

// withDefaults returns c with zero values replaced by their defaults.
func (c Config) withDefaults() Config {
	if c.QEMU == "" {
		c.QEMU = DefaultQEMU
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.CPUs == 0 {
		c.CPUs = DefaultCPUs
	}
	if c.Accel == "" {
		c.Accel = DefaultAccel
	}
	return c
}

// maxSocketPath is the longest path a unix socket address can hold on
// Linux (sun_path is 108 bytes including the terminating NUL).
const maxSocketPath = 107

// validate checks c, which must have its defaults applied.
func (c Config) validate() error {
	var errs []error
	if c.Kernel == "" {
		errs = append(errs, errors.New("no kernel given"))
	}
	if c.Rootfs == "" {
		errs = append(errs, errors.New("no rootfs image given"))
	}
	if c.ConsoleLog == "" {
		errs = append(errs, errors.New("no console log file given"))
	}
	if c.MemoryMiB < 0 {
		errs = append(errs, fmt.Errorf("invalid memory size %d MiB", c.MemoryMiB))
	}
	if c.CPUs < 0 {
		errs = append(errs, fmt.Errorf("invalid CPU count %d", c.CPUs))
	}
	if c.Accel != AccelTCG && c.Accel != AccelKVM {
		errs = append(errs, fmt.Errorf("unknown accelerator %q (want %q or %q)", c.Accel, AccelTCG, AccelKVM))
	}
	if c.Init != "" && (!strings.HasPrefix(c.Init, "/") || strings.ContainsAny(c.Init, " \t\n\"")) {
		errs = append(errs, fmt.Errorf("init %q must be an absolute path without spaces or quotes", c.Init))
	}
	for i, d := range c.Disks {
		if d.Path == "" {
			errs = append(errs, fmt.Errorf("disk %d has no path", i+1))
		}
	}
	if len(c.AgentSocket) > maxSocketPath {
		errs = append(errs, fmt.Errorf("agent socket path %q is longer than %d bytes", c.AgentSocket, maxSocketPath))
	}
	return errors.Join(errs...)
}

// checkFiles verifies that the files QEMU reads exist, so a typo is
// reported plainly rather than as a QEMU error.
func (c Config) checkFiles() error {
	files := []struct{ what, path string }{
		{"kernel", c.Kernel},
		{"rootfs image", c.Rootfs},
	}
	for i, d := range c.Disks {
		files = append(files, struct{ what, path string }{fmt.Sprintf("disk %d", i+1), d.Path})
	}
	for _, f := range files {
		fi, err := os.Stat(f.path)
		if err != nil {
			return fmt.Errorf("%s: %w", f.what, err)
		}
		if fi.IsDir() {
			return fmt.Errorf("%s %s is a directory", f.what, f.path)
		}
	}
	return nil
}
