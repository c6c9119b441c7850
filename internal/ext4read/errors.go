package ext4read

import (
	"errors"
	"fmt"
)

// Errors that the reader's errors wrap, to be told apart with errors.Is.
var (
	// ErrCorrupt: the image breaks an ext4 rule the reader relies on.
	ErrCorrupt = errors.New("corrupt ext4 filesystem")
	// ErrUnsupported: the image uses an ext4 feature the reader does not
	// implement.
	ErrUnsupported = errors.New("unsupported ext4 feature")
	// ErrLimit: the tree is larger or deeper than Options allow.
	ErrLimit = errors.New("ext4 tree exceeds a limit")
)

// kindError carries a readable message and the sentinel it belongs to, so
// that messages read naturally ("inode 12: bad extent magic") and callers
// can still test the kind.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

func corrupt(format string, args ...any) error {
	return &kindError{ErrCorrupt, fmt.Sprintf(format, args...)}
}

func unsupported(format string, args ...any) error {
	return &kindError{ErrUnsupported, fmt.Sprintf(format, args...)}
}

func overLimit(format string, args ...any) error {
	return &kindError{ErrLimit, fmt.Sprintf(format, args...)}
}

// inodeErr names the inode an error is about.
func inodeErr(ino uint32, err error) error {
	return fmt.Errorf("inode %d: %w", ino, err)
}
