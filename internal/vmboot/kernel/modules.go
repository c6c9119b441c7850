package kernel

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Open describes the unpacked kernel package whose kernel image is vmlinuz,
// named boot/vmlinuz-RELEASE: its modules are in lib/modules/RELEASE next to
// boot. The package fields are left empty.
func Open(vmlinuz string) (Kernel, error) {
	release, ok := strings.CutPrefix(filepath.Base(vmlinuz), "vmlinuz-")
	if !ok || release == "" {
		return Kernel{}, fmt.Errorf("kernel %s is not named vmlinuz-RELEASE, so its modules cannot be found", vmlinuz)
	}
	k := Kernel{
		Release: release,
		Vmlinuz: vmlinuz,
		Modules: filepath.Join(filepath.Dir(filepath.Dir(vmlinuz)), "lib", "modules", release),
	}
	if _, err := os.Stat(k.Modules); err != nil {
		return Kernel{}, fmt.Errorf("kernel %s: modules: %w", vmlinuz, err)
	}
	return k, nil
}

// Module is a loadable module of a Kernel.
type Module struct {
	Name string // as the kernel names it, e.g. "virtio_blk"
	Path string // relative to Kernel.Modules, e.g. "kernel/drivers/block/virtio_blk.ko"
}

// LoadOrder returns the modules to load, in order, for the kernel to have
// the named ones: each comes after those it depends on. Modules the kernel
// has built in are left out, so the list is empty when it has them all.
//
// Unpacking a kernel package does not run depmod, so dependencies come from
// the depends= field of each module's .modinfo section, and built-in modules
// from modules.builtin. Only uncompressed modules are supported.
func (k Kernel) LoadOrder(names ...string) ([]Module, error) {
	files, err := k.moduleFiles()
	if err != nil {
		return nil, err
	}
	builtin, err := k.builtinModules()
	if err != nil {
		return nil, err
	}
	var (
		order []Module
		state = map[string]int{} // 1: visiting, 2: done
		visit func(name, neededBy string) error
	)
	visit = func(name, neededBy string) error {
		name = moduleName(name)
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel %s: module %s depends on itself", k.Release, name)
		case 2:
			return nil
		}
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			what := "module " + name
			if neededBy != "" {
				what += " (needed by " + neededBy + ")"
			}
			return fmt.Errorf("kernel %s has no %s, neither built in nor in %s", k.Release, what, k.Modules)
		}
		if !strings.HasSuffix(path, ".ko") {
			return fmt.Errorf("kernel %s: module %s is compressed (%s), which is not supported", k.Release, name, path)
		}
		state[name] = 1
		deps, err := moduleDepends(filepath.Join(k.Modules, path))
		if err != nil {
			return fmt.Errorf("kernel %s: %w", k.Release, err)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, Module{Name: name, Path: path})
		return nil
	}
	for _, n := range names {
		if err := visit(n, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleName normalises a module name: the kernel treats "-" and "_" alike
// and file names use either.
func moduleName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleFiles maps module names to their files below k.Modules.
func (k Kernel) moduleFiles() (map[string]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(k.Modules, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		base := d.Name()
		i := strings.Index(base, ".ko")
		if i <= 0 || !(len(base) == i+3 || base[i+3] == '.') {
			return nil
		}
		rel, err := filepath.Rel(k.Modules, p)
		if err != nil {
			return err
		}
		files[moduleName(base[:i])] = rel
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kernel %s: listing modules: %w", k.Release, err)
	}
	return files, nil
}

// builtinModules reads modules.builtin, which lists what would have been
// modules had they not been built in. A kernel without it has none.
func (k Kernel) builtinModules() (map[string]bool, error) {
	f, err := os.Open(filepath.Join(k.Modules, "modules.builtin"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Release, err)
	}
	defer f.Close()
	builtin := map[string]bool{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		if name, ok := strings.CutSuffix(filepath.Base(strings.TrimSpace(s.Text())), ".ko"); ok {
			builtin[moduleName(name)] = true
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("kernel %s: modules.builtin: %w", k.Release, err)
	}
	return builtin, nil
}

// moduleDepends reads the modules a module file depends on from the
// depends= entry of its .modinfo section (NUL-separated key=value strings).
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	for _, field := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(field, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, d)
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}
