package service

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestListenReplacesOnlyStaleSockets(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k.sock")

	// A socket a live process answers on stays, and the error names it.
	live, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = listen(path, 0o660, -1)
	if want := fmt.Sprintf("socket %s is in use by another process (pid %d)", path, os.Getpid()); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("listen on a live socket: %v, want %q", err, want)
	}
	// A socket left by a server that is gone is replaced.
	live.(*net.UnixListener).SetUnlinkOnClose(false)
	live.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the stale socket should be there: %v", err)
	}
	ln, err := listen(path, 0o660, -1)
	if err != nil {
		t.Fatalf("listen on a stale socket: %v", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the new socket does not answer: %v", err)
	}
	c.Close()
	ln.Close()

	// Anything else at the path is left alone.
	if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := listen(path, 0o660, -1); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("listen over a regular file: %v, want an error saying it is not a socket", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "data" {
		t.Errorf("the regular file was changed: %q, %v", b, err)
	}
}

func TestListenModeAndGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("giving the socket another group needs root")
	}
	path := filepath.Join(t.TempDir(), "k.sock")
	ln, err := listen(path, 0o640, 4242)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o640 || st.Gid != 4242 {
		t.Errorf("socket: mode %v, gid %d; want a socket, 0640, gid 4242", fi.Mode(), st.Gid)
	}
}

func TestLookupGroup(t *testing.T) {
	for name, want := range map[string]int{"": -1, "0": 0, "4242": 4242, "root": 0} {
		if got, err := lookupGroup(name); err != nil || got != want {
			t.Errorf("lookupGroup(%q) = %d, %v; want %d", name, got, err, want)
		}
	}
	if _, err := lookupGroup("no-such-group-kiln"); err == nil || !strings.Contains(err.Error(), "socket_group") {
		t.Errorf("an unknown group: %v, want an error naming socket_group", err)
	}
}
