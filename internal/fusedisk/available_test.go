package fusedisk

import (
	"errors"
	"strings"
	"testing"
)

// Without root, mounting needs fusermount: its absence is ErrUnavailable,
// saying so.
func TestUnavailableWithoutFusermount(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := checkAvailable(false)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "fusermount3") {
		t.Errorf("checkAvailable without root or fusermount: %v", err)
	}
}
