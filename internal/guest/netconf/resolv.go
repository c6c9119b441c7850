package netconf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ResolvConf renders a resolv.conf listing servers and, when not empty, a
// search domain.
func ResolvConf(servers []netip.Addr, search string) []byte {
	var b strings.Builder
	b.WriteString("# Written by kiln from the kernel command line.\n")
	if search != "" {
		fmt.Fprintf(&b, "search %s\n", search)
	}
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	return []byte(b.String())
}

// WriteResolvConf writes root/etc/resolv.conf. It replaces the file
// atomically, including when it is a symlink (to systemd-resolved's stub
// file, say), so the guest resolves through the given servers directly.
//
// When /etc is read-only it writes runDir/resolv.conf instead and
// bind-mounts it over /etc/resolv.conf, which must then exist already.
// It returns the path it wrote.
func WriteResolvConf(root, runDir string, servers []netip.Addr, search string) (string, error) {
	content := ResolvConf(servers, search)
	target := filepath.Join(root, "etc/resolv.conf")
	err := replaceFile(target, content, 0o644)
	if err == nil {
		return target, nil
	}
	if !isReadOnly(err) {
		return "", fmt.Errorf("write %s: %w", target, err)
	}

	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return "", fmt.Errorf("/etc is read-only and %s cannot be created: %w", runDir, err)
	}
	source := filepath.Join(runDir, "resolv.conf")
	// Rewrite in place: a bind mount from an earlier run shows the same
	// inode, so it picks up the new content.
	if err := os.WriteFile(source, content, 0o644); err != nil {
		return "", fmt.Errorf("/etc is read-only and %s cannot be written: %w", source, err)
	}
	if mounted, _ := sameFile(source, target); mounted {
		return source, nil
	}
	if err := ensureFile(target); err != nil {
		return "", fmt.Errorf("/etc is read-only and %s cannot be bind-mounted over: %w", target, err)
	}
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return "", fmt.Errorf("/etc is read-only; bind-mount %s over %s: %w", source, target, err)
	}
	return source, nil
}

// ensureFile creates name if it does not exist and can be created: a
// dangling symlink into a writable /run, for example.
func ensureFile(name string) error {
	if _, err := os.Stat(name); !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// replaceFile writes content to a temporary file beside name and renames it
// over name.
func replaceFile(name string, content []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".kiln-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(content)
	if err == nil {
		err = f.Chmod(perm)
	}
	if closeErr := f.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// isReadOnly reports errors meaning the directory cannot be written.
func isReadOnly(err error) bool {
	return errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}

func sameFile(a, b string) (bool, error) {
	fa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(fa, fb), nil
}
