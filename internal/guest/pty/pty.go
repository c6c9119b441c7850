// Package pty opens pseudo-terminal pairs and configures terminals and
// serial lines: raw mode, line speed, flushing.
package pty

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Open returns a new pseudo-terminal: the controller side, and the terminal
// side a process would use as its tty, named after its /dev/pts path. The
// controller is non-blocking, so it supports deadlines.
func Open() (controller, terminal *os.File, err error) {
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	controller = os.NewFile(uintptr(fd), "/dev/ptmx")
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		controller.Close()
		return nil, nil, fmt.Errorf("unlock pseudo-terminal: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		controller.Close()
		return nil, nil, fmt.Errorf("get pseudo-terminal number: %w", err)
	}
	name := fmt.Sprintf("/dev/pts/%d", n)
	// TIOCGPTPEER opens the terminal side without a path lookup, so it
	// works whatever devpts instance is mounted at /dev/pts.
	tfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TIOCGPTPEER,
		uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if errno == 0 {
		return controller, os.NewFile(tfd, name), nil
	}
	terminal, err = os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		controller.Close()
		return nil, nil, fmt.Errorf("open %s: %w", name, err)
	}
	return controller, terminal, nil
}

// MakeRaw puts the terminal open as f into raw mode: no echo, no line
// editing, no signal characters and no output processing, 8-bit clean, and
// ignoring modem control lines. It is cfmakeraw(3) plus CLOCAL.
func MakeRaw(f *os.File) error {
	return Control(f, func(fd int) error {
		t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
		if err != nil {
			return fmt.Errorf("%s is not a terminal: %w", f.Name(), err)
		}
		t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		t.Oflag &^= unix.OPOST
		t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		t.Cflag &^= unix.CSIZE | unix.PARENB
		t.Cflag |= unix.CS8 | unix.CLOCAL | unix.CREAD
		t.Cc[unix.VMIN] = 1
		t.Cc[unix.VTIME] = 0
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
			return fmt.Errorf("set raw mode on %s: %w", f.Name(), err)
		}
		return nil
	})
}

// SetSpeed sets the line speed of a serial terminal, given as a B*
// constant such as unix.B115200. Emulated UARTs pace their output by it.
func SetSpeed(f *os.File, speed uint32) error {
	return Control(f, func(fd int) error {
		t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
		if err != nil {
			return fmt.Errorf("%s is not a terminal: %w", f.Name(), err)
		}
		t.Cflag = t.Cflag&^unix.CBAUD | speed
		t.Ispeed, t.Ospeed = speed, speed
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
			return fmt.Errorf("set the speed of %s: %w", f.Name(), err)
		}
		return nil
	})
}

// FlushInput discards input the terminal has received but nobody has read.
func FlushInput(f *os.File) error {
	return Control(f, func(fd int) error {
		return unix.IoctlSetInt(fd, unix.TCFLSH, unix.TCIFLUSH)
	})
}

// Control runs fn on the descriptor of f without f.Fd(), which would switch
// f to blocking mode and so stop deadlines and Close from interrupting
// reads.
func Control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fn(int(f.Fd()))
	}
	var fnErr error
	if err := rc.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}
