package initproc

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/initconfig"
)

// Console returns the terminal for kiln-init's messages and the workload's
// stdio: the console the kernel opened as file descriptors 0-2. If those are
// not a terminal (the kernel found no console, and the Go runtime put
// /dev/null there), it tries /dev/console again now that /dev is mounted and
// moves it onto 0-2.
func Console() *os.File {
	if isTerminal(os.Stdin) {
		return os.Stdin
	}
	f, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return os.Stdin
	}
	defer f.Close()
	for fd := 0; fd <= 2; fd++ {
		if err := unix.Dup3(int(f.Fd()), fd, 0); err != nil {
			return os.Stdin
		}
	}
	return os.Stdin
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Command returns the workload command: started with setsid, with the console
// as controlling terminal and stdio, so that job control and ^C work, and
// the credentials of the image user.
func Command(p *initconfig.Process, console *os.File) *exec.Cmd {
	cmd := &exec.Cmd{
		Path:   p.Path,
		Args:   p.Args,
		Env:    p.Env,
		Dir:    p.Dir,
		Stdin:  console,
		Stdout: console,
		Stderr: console,
		SysProcAttr: &syscall.SysProcAttr{
			Setsid: true,
			Credential: &syscall.Credential{
				Uid:    p.UID,
				Gid:    p.GID,
				Groups: p.Groups,
			},
		},
	}
	if isTerminal(console) {
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0 // the child's stdin
	}
	return cmd
}

// PrepareWorkingDir creates the workload's working directory when missing,
// as container runtimes do, and checks that it is a directory. A failed
// chdir would otherwise surface as an exec error that looks like a missing
// executable.
func PrepareWorkingDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		if _, statErr := os.Stat(dir); statErr != nil {
			return &initconfig.Error{Status: initconfig.StatusFailure,
				Err: fmt.Errorf("working directory %s: %w", dir, err)}
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return &initconfig.Error{Status: initconfig.StatusFailure, Err: fmt.Errorf("working directory %s: %w", dir, err)}
	}
	if !fi.IsDir() {
		return &initconfig.Error{Status: initconfig.StatusFailure, Err: fmt.Errorf("working directory %s is not a directory", dir)}
	}
	return nil
}

// StartError explains a failure to start the workload and gives it the exit
// status a shell would: 127 when something is missing, 126 when the file
// cannot be executed.
func StartError(path string, err error) error {
	switch {
	case errors.Is(err, unix.ENOENT):
		// The file was there a moment ago, so what is missing is the
		// program that runs it.
		return &initconfig.Error{Status: initconfig.StatusNotFound, Err: fmt.Errorf(
			"start %s: %w (its ELF interpreter or #! interpreter is missing from the image)", path, unix.ENOENT)}
	case errors.Is(err, unix.ENOEXEC):
		return &initconfig.Error{Status: initconfig.StatusNotExecutable, Err: fmt.Errorf(
			"start %s: %w (not a binary for this machine, or a script without a #! line)", path, err)}
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM), errors.Is(err, unix.EISDIR),
		errors.Is(err, unix.ETXTBSY), errors.Is(err, unix.ELIBBAD):
		return &initconfig.Error{Status: initconfig.StatusNotExecutable, Err: fmt.Errorf("start %s: %w", path, err)}
	}
	return &initconfig.Error{Status: initconfig.StatusFailure, Err: fmt.Errorf("start %s: %w", path, err)}
}

// ExitStatus converts a wait status to the number a shell reports: the exit
// code, or 128 plus the signal number.
func ExitStatus(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// StatusLine is the one line kiln-init prints when the workload ends, which
// hosts parse to learn the result.
func StatusLine(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "workload killed by signal " + signalName(ws.Signal())
	}
	return fmt.Sprintf("workload exited with status %d", ws.ExitStatus())
}

// FailureLine is the status line for a workload that never started.
func FailureLine(status int) string {
	return fmt.Sprintf("workload exited with status %d", status)
}

func signalName(sig syscall.Signal) string {
	if name := unix.SignalName(sig); name != "" {
		return name
	}
	return fmt.Sprintf("%d", int(sig))
}
