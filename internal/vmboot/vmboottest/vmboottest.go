// Package vmboottest provides what tests need to boot throwaway VMs: the
// kernel, a static busybox and small ext4 root filesystems built from them.
//
// Downloads are cached in $KILN_TEST_CACHE, or $HOME/.cache/kiln-test if it
// is unset, so only the first run needs the network.
//
// When something a boot test needs is missing (QEMU, apt, mkfs.ext4, the
// network) the test is skipped with a message saying what is missing. Set
// KILN_TEST_REQUIRE_VM=1, as CI should, to make that a failure instead, so
// that boot tests cannot pass by not running.
package vmboottest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/testenv"
	"github.com/kilnfs/kiln/internal/vmboot"
	"github.com/kilnfs/kiln/internal/vmboot/debpkg"
	"github.com/kilnfs/kiln/internal/vmboot/kernel"
)

// Environment variables read by this package.
const (
	EnvCacheDir  = "KILN_TEST_CACHE"
	EnvRequireVM = "KILN_TEST_REQUIRE_VM"
)

// fetchTimeout bounds a download of the kernel or busybox package.
const fetchTimeout = 5 * time.Minute

// busyboxPackage ships a statically linked busybox, so a root filesystem
// needs no shared libraries.
const busyboxPackage = "busybox-static"

// Unavailable skips the test because something it needs is missing, or
// fails it if EnvRequireVM is set.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv(EnvRequireVM) != "" {
		t.Fatalf("%s (and %s is set)", msg, EnvRequireVM)
	}
	if testenv.InCI() {
		t.Fatalf("%s: CI must run the VM boot tests", msg)
	}
	t.Skipf("skipping VM boot test: %s (set %s=1 to fail instead)", msg, EnvRequireVM)
}

// CacheDir returns the download cache directory, creating it.
func CacheDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(EnvCacheDir)
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatalf("finding the test cache directory: %v (set %s)", err, EnvCacheDir)
		}
		dir = filepath.Join(home, ".cache", "kiln-test")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("creating test cache directory: %v", err)
	}
	return dir
}

// RequireQEMU skips the test if QEMU is not installed.
func RequireQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath(vmboot.DefaultQEMU); err != nil {
		Unavailable(t, "%v", fmt.Errorf("%w: %w", vmboot.ErrQEMUNotFound, err))
	}
}

// Kernel returns the Debian cloud kernel, fetching it into the cache.
func Kernel(t testing.TB) kernel.Kernel {
	t.Helper()
	k, err := fetchKernel(CacheDir(t))
	if err != nil {
		fetchFailed(t, err)
	}
	return k
}

// Busybox returns the path of a static busybox binary, fetching it into the
// cache.
func Busybox(t testing.TB) string {
	t.Helper()
	bin, err := fetchBusybox(CacheDir(t))
	if err != nil {
		fetchFailed(t, err)
	}
	return bin
}

// Fetches are done once per test binary: even with a warm cache, each asks
// apt-cache for the current version, which takes a noticeable fraction of a
// second.
var (
	fetchKernel = onceByKey(func(ctx context.Context, cacheDir string) (kernel.Kernel, error) {
		return kernel.Fetch(ctx, cacheDir)
	})
	fetchBusybox = onceByKey(func(ctx context.Context, cacheDir string) (string, error) {
		pkg, err := debpkg.Candidate(ctx, busyboxPackage)
		if err != nil {
			return "", err
		}
		dir, err := debpkg.Fetch(ctx, cacheDir, pkg.Name, pkg.Version)
		if err != nil {
			return "", err
		}
		bin := filepath.Join(dir, "bin", "busybox")
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("package %s=%s has no busybox: %w", pkg.Name, pkg.Version, err)
		}
		return bin, nil
	})
)

// onceByKey memoizes fetch per cache directory. Fetches run under their own
// timeout rather than a test's context, as every later test shares the
// result.
func onceByKey[T any](fetch func(context.Context, string) (T, error)) func(string) (T, error) {
	var mu sync.Mutex
	done := map[string]func() (T, error){}
	return func(key string) (T, error) {
		mu.Lock()
		f, ok := done[key]
		if !ok {
			f = sync.OnceValues(func() (T, error) {
				ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
				defer cancel()
				return fetch(ctx, key)
			})
			done[key] = f
		}
		mu.Unlock()
		return f()
	}
}

// fetchFailed treats a host without apt, or without network, as one that
// cannot run boot tests.
func fetchFailed(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, debpkg.ErrNoApt) {
		Unavailable(t, "%v", err)
	}
	Unavailable(t, "cannot fetch packages (offline?): %v", err)
}

// KilnInit builds kiln-init, statically linked, into a directory of the
// test and returns its path.
func KilnInit(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kiln-init")
	cmd := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/kilnfs/kiln/cmd/kiln-init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build kiln-init: %v\n%s", err, out)
	}
	return bin
}

// BusyboxRootfs builds an ext4 image whose /init is the given shell script
// and returns its path. A static busybox is at /bin/busybox and /bin/sh. Its
// shell runs applets (mount, stty, ...) by name without links in PATH, but
// only once /proc is mounted, so scripts start with
// "/bin/busybox mount -t proc proc /proc". The image has empty /proc, /sys,
// /dev and /tmp to mount on.
func BusyboxRootfs(t testing.TB, initScript string) string {
	t.Helper()
	busybox := Busybox(t)

	root := t.TempDir()
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(root, "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(initScript), 0o755); err != nil {
		t.Fatal(err)
	}
	return MakeExt4(t, root, "64M")
}

// MakeExt4 builds an ext4 image of the given size (mkfs.ext4 syntax, e.g.
// "64M") from the directory tree at dir, without needing root, and returns
// its path. Its blocks are 4 KiB, as in kiln's disks and as a dm-verity
// target with 4 KiB blocks over it needs; mkfs.ext4 would choose 1 KiB
// for a small filesystem.
func MakeExt4(t testing.TB, dir, size string) string {
	t.Helper()
	mkfs, err := SystemTool("mkfs.ext4")
	if err != nil {
		Unavailable(t, "mkfs.ext4 not found (install e2fsprogs): %v", err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	out, err := exec.CommandContext(t.Context(), mkfs, "-q", "-F", "-b", "4096", "-d", dir, img, size).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img
}

// SystemTool finds a system tool such as mkfs.ext4 or debugfs, which may be
// outside a non-root user's PATH.
func SystemTool(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err == nil {
		return path, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p, serr := exec.LookPath(filepath.Join(dir, name)); serr == nil {
			return p, nil
		}
	}
	return "", err
}

// PowerOff is the shell code that ends a boot test's init script: it powers
// the VM off through sysrq (which needs /proc mounted) and waits, because
// the kernel panics if init exits first.
const PowerOff = "echo o > /proc/sysrq-trigger\nsleep 30\n"
