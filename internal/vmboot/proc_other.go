//go:build !linux

package vmboot

import "syscall"

func sysProcAttr() *syscall.SysProcAttr { return nil }
