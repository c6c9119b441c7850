package vmboot

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/vmboot/initramfs"
	"github.com/kilnfs/kiln/internal/vmboot/kernel"
)

// buildInitramfs writes the initramfs that loads cfg.Modules into dir and
// returns its path, or "" when the kernel has them all built in and
// cfg.Initramfs is not set.
func buildInitramfs(cfg Config, dir string) (string, error) {
	if len(cfg.Modules) == 0 && !cfg.Initramfs {
		return "", nil
	}
	k, err := kernel.Open(cfg.Kernel)
	if err != nil {
		return "", err
	}
	mods, err := k.LoadOrder(cfg.Modules...)
	if err != nil || (len(mods) == 0 && !cfg.Initramfs) {
		return "", err
	}
	init := cfg.InitramfsInit
	if init == "" {
		dir, err := guest.FindBinDir(guest.InitBinary)
		if err != nil {
			names := make([]string, len(mods))
			for i, m := range mods {
				names[i] = m.Name
			}
			if len(names) == 0 {
				return "", fmt.Errorf("the boot needs kiln-init in an initramfs: %w", err)
			}
			return "", fmt.Errorf("kernel %s needs %s loaded by kiln-init from an initramfs: %w",
				k.Release, strings.Join(names, ", "), err)
		}
		init = filepath.Join(dir, guest.InitBinary)
	}
	if err := guest.CheckStaticELF(init); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "initramfs-*.cpio")
	if err != nil {
		return "", err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	err = initramfs.Write(w, init, k, mods)
	if err == nil {
		err = w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}
