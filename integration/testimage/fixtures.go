package testimage

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kilnfs/kiln/internal/dirtar"

	"golang.org/x/sys/unix"
)

// CacheDir is where tests keep expensive fixtures between runs, outside
// the repository: $KILN_TEST_CACHE, else ~/.cache/kiln-test.
func CacheDir() string {
	if d := os.Getenv("KILN_TEST_CACHE"); d != "" {
		return d
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "kiln-test")
	}
	return filepath.Join(os.TempDir(), "kiln-test")
}

// Cached returns dir, built once with make (into a temporary sibling,
// renamed into place) and kept between runs; concurrent test processes
// wait for each other. Name dir under CacheDir() and change the name when
// what make writes changes.
func Cached(dir string, make func(tmp string) error) (string, error) {
	return cached(dir, make)
}

// cached builds dir once with make (into a temporary sibling, renamed into
// place), serialised across processes by a lock file.
func cached(dir string, make func(tmp string) error) (string, error) {
	if _, err := os.Stat(dir); err == nil {
		return dir, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(dir+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", err
	}
	if _, err := os.Stat(dir); err == nil {
		return dir, nil
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := make(tmp); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	return dir, os.Rename(tmp, dir)
}

// debianMirror reads the first Debian mirror of this machine's apt
// sources, so that nothing in the project names one.
func debianMirror() (string, error) {
	for _, f := range []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && fields[0] == "URIs:" {
				fh.Close()
				return fields[1], nil
			}
			if len(fields) >= 3 && fields[0] == "deb" && !strings.Contains(fields[1], "security") {
				if strings.HasPrefix(fields[1], "[") && len(fields) >= 4 {
					fh.Close()
					return fields[2], nil
				}
				fh.Close()
				return fields[1], nil
			}
		}
		fh.Close()
	}
	return "", errors.New("no Debian mirror in the apt sources")
}

// ErrNeedRoot is returned by fixtures that only root can make.
var ErrNeedRoot = errors.New("needs root")

// Minbase returns a debootstrap --variant=minbase bookworm tree, made once
// (about a minute) and cached. extra lists packages to --include, which
// give a separate cached tree (e.g. "systemd-sysv" for a bootable one).
func Minbase(extra ...string) (string, error) {
	name := "minbase-bookworm"
	if len(extra) > 0 {
		name += "-" + strings.Join(extra, "-")
	}
	return cached(filepath.Join(CacheDir(), "trees", name), func(tmp string) error {
		if os.Geteuid() != 0 {
			return ErrNeedRoot
		}
		mirror, err := debianMirror()
		if err != nil {
			return err
		}
		args := []string{"--variant=minbase"}
		if len(extra) > 0 {
			args = append(args, "--include="+strings.Join(extra, ","))
		}
		args = append(args, "bookworm", tmp, mirror)
		out, err := exec.Command("debootstrap", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("debootstrap: %w\n%s", err, tail(out))
		}
		// apt caches are not part of an image.
		os.RemoveAll(filepath.Join(tmp, "var/cache/apt/archives"))
		return os.MkdirAll(filepath.Join(tmp, "var/cache/apt/archives/partial"), 0o755)
	})
}

// MinbaseTar returns the minbase tree as a layer tar file, cached.
func MinbaseTar(extra ...string) (string, error) {
	tree, err := Minbase(extra...)
	if err != nil {
		return "", err
	}
	file := tree + ".tar"
	if _, err := os.Stat(file); err == nil {
		return file, nil
	}
	tmp := file + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return "", err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if err := dirtar.Write(w, tree, dirtar.Options{}); err != nil {
		f.Close()
		return "", err
	}
	if err := w.Flush(); err != nil {
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return file, os.Rename(tmp, file)
}

// Busybox returns a directory with a static busybox at bin/busybox and
// bin/sh linking to it, from Debian's busybox-static package, cached.
func Busybox() (string, error) {
	return cached(filepath.Join(CacheDir(), "trees", "busybox"), func(tmp string) error {
		dl := tmp + ".deb"
		if err := os.MkdirAll(dl, 0o755); err != nil {
			return err
		}
		defer os.RemoveAll(dl)
		cmd := exec.Command("apt-get", "download", "busybox-static")
		cmd.Dir = dl
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get download busybox-static: %w\n%s", err, tail(out))
		}
		debs, _ := filepath.Glob(filepath.Join(dl, "busybox-static_*.deb"))
		if len(debs) == 0 {
			return errors.New("apt-get download busybox-static fetched nothing")
		}
		x := tmp + ".x"
		defer os.RemoveAll(x)
		if out, err := exec.Command("dpkg", "-x", debs[0], x).CombinedOutput(); err != nil {
			return fmt.Errorf("dpkg -x: %w\n%s", err, tail(out))
		}
		if err := os.MkdirAll(filepath.Join(tmp, "bin"), 0o755); err != nil {
			return err
		}
		data, err := os.ReadFile(filepath.Join(x, "bin", "busybox"))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, "bin", "busybox"), data, 0o755); err != nil {
			return err
		}
		return os.Symlink("busybox", filepath.Join(tmp, "bin", "sh"))
	})
}

func tail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}
