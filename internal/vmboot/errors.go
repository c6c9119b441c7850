package vmboot

import (
	"errors"
	"strings"
)

var (
	// ErrQEMUNotFound reports that the QEMU binary is not installed.
	ErrQEMUNotFound = errors.New("QEMU not found (install it with: apt-get install -y --no-install-recommends qemu-system-x86)")
	// ErrTimeout reports that Config.Timeout, or the timeout given to
	// WaitForLine, passed.
	ErrTimeout = errors.New("timed out")
	// errKilled is the cause recorded when the caller kills the VM.
	errKilled = errors.New("killed by caller")
)

// Error is a failed boot. Its message carries what a user needs to see why:
// the QEMU command line, what QEMU printed and the end of the guest console.
type Error struct {
	Err         error  // what went wrong; errors.Is works through it
	Command     string // the QEMU command line, shell-quoted
	QEMUOutput  string // QEMU's own stdout and stderr
	ConsoleLog  string // path of the console log
	ConsoleTail string // the last lines of the guest console
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("vm boot: ")
	b.WriteString(e.Err.Error())
	if e.Command != "" {
		b.WriteString("\nqemu command: ")
		b.WriteString(e.Command)
	}
	if out := strings.TrimSpace(e.QEMUOutput); out != "" {
		b.WriteString("\nqemu output:\n")
		b.WriteString(indent(out))
	}
	if e.ConsoleTail != "" {
		b.WriteString("\nguest console (end of ")
		b.WriteString(e.ConsoleLog)
		b.WriteString("):\n")
		b.WriteString(indent(e.ConsoleTail))
	} else if e.ConsoleLog != "" {
		b.WriteString("\nguest console: nothing written to ")
		b.WriteString(e.ConsoleLog)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}
