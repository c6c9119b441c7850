// Package debpkg fetches Debian binary packages with apt-get and unpacks them
// with dpkg -x into a cache directory, without installing them on the host.
//
// It needs apt-get, apt-cache and dpkg on PATH and up-to-date package lists
// (apt-get update); it does not need root.
package debpkg

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNoApt reports that the apt tools this package relies on are missing,
// as on any host that is not Debian-based.
var ErrNoApt = errors.New("apt-get, apt-cache or dpkg not found in PATH (a Debian-based host is needed to fetch packages)")

// Package is one version of a Debian binary package, as apt-cache sees it.
type Package struct {
	Name    string
	Version string
	// Depends is the raw Depends field, e.g. "libc6 (>= 2.34), zlib1g".
	Depends string
}

// Candidate returns the version of name that apt would install, read from
// the host's local package lists. It does not use the network.
func Candidate(ctx context.Context, name string) (Package, error) {
	if err := checkName(name); err != nil {
		return Package{}, err
	}
	if err := lookTools("apt-cache"); err != nil {
		return Package{}, err
	}
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return Package{}, fmt.Errorf("looking up %s in the apt package lists (is it available, and has apt-get update run?): %w", name, err)
	}
	pkg := parseControl(out)
	if pkg.Name != name || pkg.Version == "" {
		return Package{}, fmt.Errorf("looking up %s in the apt package lists: unexpected apt-cache output:\n%s", name, out)
	}
	return pkg, nil
}

// parseControl reads the fields kiln uses from the first stanza of
// apt-cache show output.
func parseControl(out []byte) Package {
	var pkg Package
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break // end of the first stanza
		}
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		value = strings.TrimSpace(value)
		switch key {
		case "Package":
			pkg.Name = value
		case "Version":
			pkg.Version = value
		case "Depends":
			pkg.Depends = value
		}
	}
	return pkg
}

// Fetch returns the directory holding the unpacked contents of package name
// at version. The first call downloads the .deb with apt-get download and
// unpacks it under cacheDir; later calls, from this or any other process,
// reuse it. The returned directory must be treated as read-only.
func Fetch(ctx context.Context, cacheDir, name, version string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	if version == "" || strings.ContainsAny(version, "/ \t\n") {
		return "", fmt.Errorf("invalid version %q for package %s", version, name)
	}
	if cacheDir == "" {
		return "", errors.New("fetching a Debian package: no cache directory given")
	}

	base := filepath.Join(cacheDir, "deb")
	// Epochs put a colon in versions; apt escapes it the same way in .deb names.
	key := name + "_" + strings.ReplaceAll(version, ":", "%3a")
	dir := filepath.Join(base, key)
	if ok, err := isDir(dir); err != nil || ok {
		return dir, err
	}

	if err := lookTools("apt-get", "dpkg"); err != nil {
		return "", err
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return "", fmt.Errorf("creating package cache: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(base, key+".lock"))
	if err != nil {
		return "", fmt.Errorf("locking package cache for %s: %w", key, err)
	}
	defer unlock()

	// Another process may have finished the job while this one waited.
	if ok, err := isDir(dir); err != nil || ok {
		return dir, err
	}
	if err := removeStale(base, key); err != nil {
		return "", err
	}
	if err := download(ctx, base, key, name, version, dir); err != nil {
		return "", fmt.Errorf("fetching Debian package %s=%s: %w", name, version, err)
	}
	return dir, nil
}

// download fetches and unpacks the package into a temporary directory next
// to dir and renames it into place, so dir only ever exists complete.
func download(ctx context.Context, base, key, name, version, dir string) error {
	tmp, err := os.MkdirTemp(base, tempPrefix(key))
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	if _, err := run(ctx, tmp, "apt-get", "download", name+"="+version); err != nil {
		return err
	}
	debs, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil {
		return err
	}
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download left %d .deb files, want 1", len(debs))
	}
	root := filepath.Join(tmp, "root")
	if _, err := run(ctx, "", "dpkg", "-x", debs[0], root); err != nil {
		return err
	}
	if err := os.Rename(root, dir); err != nil {
		return fmt.Errorf("moving unpacked package into the cache: %w", err)
	}
	return nil
}

func tempPrefix(key string) string { return ".tmp-" + key + "-" }

// removeStale deletes temporary directories that an interrupted Fetch left
// behind. The caller holds the lock for key, so none of them is in use.
func removeStale(base, key string) error {
	stale, err := filepath.Glob(filepath.Join(base, tempPrefix(key)+"*"))
	if err != nil {
		return err
	}
	for _, s := range stale {
		if err := os.RemoveAll(s); err != nil {
			return fmt.Errorf("removing stale download: %w", err)
		}
	}
	return nil
}

func isDir(path string) (bool, error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("checking package cache: %w", err)
	case !fi.IsDir():
		return false, fmt.Errorf("checking package cache: %s is not a directory", path)
	}
	return true, nil
}

// checkName rejects names that could escape the cache directory or be read
// as options by apt.
func checkName(name string) error {
	if name == "" || strings.HasPrefix(name, "-") || strings.ContainsAny(name, "/= \t\n") {
		return fmt.Errorf("invalid Debian package name %q", name)
	}
	return nil
}

func lookTools(names ...string) error {
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			return fmt.Errorf("%w: %w", ErrNoApt, err)
		}
	}
	return nil
}

// run runs a command in dir and returns its standard output; on failure the
// error carries the command and everything it printed.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	// Stable, untranslated messages for parsing and for error reports.
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return nil, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, msg)
	}
	return stdout.Bytes(), nil
}
