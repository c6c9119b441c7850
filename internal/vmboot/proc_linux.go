package vmboot

import "syscall"

// sysProcAttr makes the kernel kill QEMU if the process that started it
// dies without cleaning up (a crashed test binary, say), so no VM is left
// spinning a CPU.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
