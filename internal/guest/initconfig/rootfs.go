package initconfig

import (
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// maxSymlinks matches the kernel's limit on symlinks followed in one lookup.
const maxSymlinks = 40

// hostPath maps p, an absolute path inside the guest, to a path under root on
// the machine running this code, following symlinks as the guest would:
// absolute link targets start again at root, and ".." never climbs above it.
// When root is "/" the guest and the caller share a view and the kernel does
// the resolution. A missing component is reported as the kernel would, with
// an error matching fs.ErrNotExist (or syscall.ENOTDIR).
func hostPath(root, p string) (string, error) {
	p = path.Clean("/" + p)
	if root == "" || root == "/" {
		return p, nil
	}
	resolved := "/"
	rest := strings.Split(p, "/")
	for links := 0; len(rest) > 0; {
		name := rest[0]
		rest = rest[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			resolved = path.Dir(resolved)
			continue
		}
		next := path.Join(resolved, name)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", fmt.Errorf("resolve %s in %s: %w", p, root, err)
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			resolved = next
			continue
		}
		if links++; links > maxSymlinks {
			return "", fmt.Errorf("resolve %s in %s: %w", p, root, syscall.ELOOP)
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", fmt.Errorf("resolve %s in %s: %w", p, root, err)
		}
		if path.IsAbs(target) {
			resolved = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return filepath.Join(root, resolved), nil
}

// statInRoot stats the guest path p under root, following symlinks.
func statInRoot(root, p string) (fs.FileInfo, error) {
	hp, err := hostPath(root, p)
	if err != nil {
		return nil, err
	}
	return os.Stat(hp)
}

// openInRoot opens the guest path p under root for reading.
func openInRoot(root, p string) (*os.File, error) {
	hp, err := hostPath(root, p)
	if err != nil {
		return nil, err
	}
	return os.Open(hp)
}
