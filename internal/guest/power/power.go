// Package power stops or restarts the guest machine, working around virtual
// machine monitors that cannot power a guest off.
package power

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Signals that ask an init (kiln-init or systemd) for an orderly shutdown.
// They are SIGRTMIN+4 and SIGRTMIN+5 as numbered by glibc, the signals
// systemd uses for poweroff.target and reboot.target.
const (
	SignalPowerOff = syscall.Signal(38)
	SignalReboot   = syscall.Signal(39)
)

// Logf reports progress; it may be nil.
type Logf func(format string, args ...any)

func (l Logf) printf(format string, args ...any) {
	if l != nil {
		l(format, args...)
	}
}

// How long a power-off requested through sysrq may take before it is taken
// as not supported. The request runs asynchronously in the kernel.
const sysrqGrace = 5 * time.Second

// Off syncs the filesystems and powers the machine off. When it succeeds it
// does not return; it returns an error only if every method failed.
//
// reboot(LINUX_REBOOT_CMD_POWER_OFF) is only used when the kernel has a way
// to power off: without one the kernel silently turns the request into a
// halt, which never returns and leaves the VM running with a stopped CPU
// (Firecracker, QEMU microvm without ACPI). So when no power-off method is
// detected, Off asks through /proc/sysrq-trigger, which returns if it cannot
// power off, and finally requests a restart: Firecracker exits when its
// guest restarts, and so does QEMU started with -no-reboot. (A VMM that
// advertises ACPI S5 but ignores it makes the kernel panic when PID 1 asks
// for a power-off; with panic=N on the command line that ends in a restart
// too.)
func Off(logf Logf) error {
	unix.Sync()
	if !InInitialPIDNamespace() {
		// In a container reboot(2) only ends the PID namespace, which is
		// what stopping means there; sysrq would act on the host.
		return rebootErr("power off", unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF))
	}
	if canPowerOff() {
		err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		logf.printf("power off failed: %v", err)
	}
	if err := sysrq('o'); err == nil {
		time.Sleep(sysrqGrace)
		logf.printf("the machine did not power off; restarting it instead (the VMM is expected to exit on restart)")
	}
	unix.Sync()
	return rebootErr("restart", unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART))
}

// Reboot syncs the filesystems and restarts the machine. It returns only on
// failure.
func Reboot() error {
	unix.Sync()
	return rebootErr("restart", unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART))
}

func rebootErr(what string, err error) error {
	if err == nil {
		// reboot(2) does not return on success; be explicit if it did.
		return fmt.Errorf("%s: reboot(2) returned without stopping the machine", what)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Hang blocks forever. PID 1 calls it after requesting power-off, because
// PID 1 exiting makes the kernel panic.
func Hang() {
	for {
		// A sleeping timer, unlike select{}, keeps the Go runtime from
		// declaring a deadlock and exiting.
		time.Sleep(time.Hour)
	}
}

func sysrq(key byte) error {
	f, err := os.OpenFile("/proc/sysrq-trigger", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Write([]byte{key})
	return err
}

// canPowerOff guesses whether the kernel registered a power-off handler,
// which userspace cannot query directly. On x86 that handler comes from
// ACPI and exists only if the firmware describes the S5 (soft-off) sleep
// state. Other architectures' VMs power off through PSCI or SBI.
func canPowerOff() bool {
	switch runtime.GOARCH {
	case "amd64", "386":
		dsdt, err := os.ReadFile("/sys/firmware/acpi/tables/DSDT")
		return err == nil && bytes.Contains(dsdt, []byte("_S5_"))
	default:
		return true
	}
}

// InInitialPIDNamespace reports whether this process sees the whole machine
// rather than a container's PID namespace: only there are kernel threads
// visible, and PID 2 is kthreadd. It needs /proc mounted; without it the
// answer is true, as a container runtime always provides /proc.
func InInitialPIDNamespace() bool {
	stat, err := os.ReadFile("/proc/2/stat")
	if errors.Is(err, os.ErrNotExist) {
		if _, err := os.Stat("/proc/self"); err == nil {
			return false // /proc works, but there is no PID 2.
		}
		return true
	}
	if err != nil {
		return true
	}
	return isKernelThread(string(stat))
}

// pfKthread is PF_KTHREAD from the kernel's task flags.
const pfKthread = 0x00200000

// isKernelThread reads the flags field (the 9th) of a /proc/PID/stat line.
func isKernelThread(stat string) bool {
	// The command name is parenthesised and may hold spaces; fields
	// resume after the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return false
	}
	fields := strings.Fields(stat[i+1:])
	// fields[0] is the state (field 3), so flags (field 9) is fields[6].
	if len(fields) < 7 {
		return false
	}
	flags, err := strconv.ParseUint(fields[6], 10, 64)
	return err == nil && flags&pfKthread != 0
}
