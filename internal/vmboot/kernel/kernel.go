// Package kernel provides the Linux kernel that kiln boots root filesystems
// with: Debian's cloud kernel, fetched as a package and unpacked into a cache
// rather than installed on the host.
//
// The cloud flavour is small and has ext4, NVMe and the 8250 serial driver
// built in, so it boots an ext4 image attached over NVMe without an initramfs.
// virtio drivers are modules (see Kernel.Modules).
package kernel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnfs/kiln/internal/vmboot/debpkg"
)

// MetaPackage is the Debian package that always depends on the current
// cloud kernel image.
const MetaPackage = "linux-image-cloud-amd64"

const imagePrefix = "linux-image-"

// Kernel is an unpacked kernel package.
type Kernel struct {
	// Release is the kernel release as uname -r reports it,
	// e.g. "6.1.0-56-cloud-amd64".
	Release string
	// Package and PackageVersion name the Debian package it came from.
	Package        string
	PackageVersion string
	// Vmlinuz is the bootable kernel image.
	Vmlinuz string
	// Modules is the lib/modules/<release> directory with the modules the
	// kernel does not have built in. It has no modules.dep: unpacking the
	// package does not run depmod.
	Modules string
}

// Fetch returns the current Debian cloud kernel, downloading and unpacking
// it under cacheDir on first use. The version comes from the host's apt
// package lists, so a newer kernel is picked up after apt-get update; each
// version is cached separately.
func Fetch(ctx context.Context, cacheDir string) (Kernel, error) {
	meta, err := debpkg.Candidate(ctx, MetaPackage)
	if err != nil {
		return Kernel{}, fmt.Errorf("finding the current cloud kernel: %w", err)
	}
	name, version, err := imageDependency(meta.Depends)
	if err != nil {
		return Kernel{}, fmt.Errorf("finding the current cloud kernel: %s %s: %w", meta.Name, meta.Version, err)
	}
	if version == "" {
		img, err := debpkg.Candidate(ctx, name)
		if err != nil {
			return Kernel{}, fmt.Errorf("finding the current cloud kernel: %w", err)
		}
		version = img.Version
	}
	return FetchPackage(ctx, cacheDir, name, version)
}

// FetchPackage returns the given kernel image package, e.g.
// "linux-image-6.1.0-56-cloud-amd64" at "6.1.192-2", downloading and
// unpacking it under cacheDir on first use.
func FetchPackage(ctx context.Context, cacheDir, name, version string) (Kernel, error) {
	release, ok := strings.CutPrefix(name, imagePrefix)
	if !ok || release == "" {
		return Kernel{}, fmt.Errorf("%q is not a kernel image package", name)
	}
	dir, err := debpkg.Fetch(ctx, cacheDir, name, version)
	if err != nil {
		return Kernel{}, err
	}
	vmlinuz := filepath.Join(dir, "boot", "vmlinuz-"+release)
	if _, err := os.Stat(vmlinuz); err != nil {
		return Kernel{}, fmt.Errorf("kernel package %s=%s: unexpected layout: %w", name, version, err)
	}
	k, err := Open(vmlinuz)
	if err != nil {
		return Kernel{}, fmt.Errorf("kernel package %s=%s: unexpected layout: %w", name, version, err)
	}
	k.Package, k.PackageVersion = name, version
	return k, nil
}

// imageDependency picks the kernel image package out of the meta package's
// Depends field, e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
// version is empty when the dependency does not pin one.
func imageDependency(depends string) (name, version string, err error) {
	for _, dep := range strings.Split(depends, ",") {
		// Alternatives ("a | b") are not used by the meta package; take the first.
		dep, _, _ = strings.Cut(dep, "|")
		dep = strings.TrimSpace(dep)
		name, constraint, _ := strings.Cut(dep, " ")
		if !strings.HasPrefix(name, imagePrefix) {
			continue
		}
		constraint = strings.TrimSpace(constraint)
		if v, ok := strings.CutPrefix(constraint, "(="); ok {
			version = strings.TrimSpace(strings.TrimSuffix(v, ")"))
		}
		return name, version, nil
	}
	return "", "", fmt.Errorf("no %s* package in Depends %q", imagePrefix, depends)
}
