// Package testenv decides what a test does when the machine lacks what it
// needs (root, QEMU, containerd): on a developer's machine it skips with
// a message saying why; in CI (CI=true), which is set up to run
// everything, it fails, so that nothing passes by not running. Tests that
// may be left out on purpose do so by an explicit variable instead.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// InCI reports whether the tests run in CI.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test (or fails it in CI) because something it
// needs is missing.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s: CI must run this test", msg)
	}
	t.Skip(msg)
}
