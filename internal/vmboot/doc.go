// Package vmboot boots a root filesystem image in a QEMU microVM, to prove
// that it boots and to run things inside it.
//
// The VM is QEMU's microvm machine with the image on an NVMe disk, further
// disks (such as a container's scratch disk) on NVMe controllers of their
// own, the guest console on the first serial port (ttyS0) written to a
// file, and optionally a second serial port (ttyS1) wired to a host unix
// socket for a guest agent. A boot ends when the guest powers off, reboots
// or panics (QEMU runs with -no-reboot, the kernel with panic=-1), or when
// the runner kills it.
//
// The kernel must have ext4, NVMe and the 8250 serial driver built in; the
// Debian cloud kernel from package kernel does. Modules the guest needs
// before its root is mounted (overlayfs is one in that kernel) are loaded
// by kiln-init from a small initramfs that Start builds (package initramfs),
// which also creates the devices of dm-mod.create= when the kernel has no
// CONFIG_DM_INIT (Config.Initramfs).
// Under TCG the runner measures the host's TSC frequency and passes it to
// the guest (see package tsc), because the guest cannot reliably calibrate
// it on microvm.
package vmboot
