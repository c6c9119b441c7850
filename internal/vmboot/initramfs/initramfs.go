// Package initramfs writes the small initramfs that kiln boots a kernel
// with when the kernel needs modules before the root can be mounted or
// composed (overlay.ko, the virtio-blk chain): kiln-init as /init, the
// modules, and guest.InitramfsManifest listing them in load order. kiln-init
// recognises the manifest, loads the modules and switches to the real root
// (package guest/switchroot).
//
// The archive is a newc cpio, written here without external tools, and not
// compressed: the kernel unpacks it faster than it would decompress it.
package initramfs

import (
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/vmboot/kernel"
)

// Write writes an initramfs whose /init is the kiln-init binary at init
// and which loads modules, files of k, in order.
func Write(w io.Writer, init string, k kernel.Kernel, modules []kernel.Module) error {
	c := &cpioWriter{w: w}
	// The kernel opens /dev/console for /init's stdio before it runs it.
	for _, d := range []string{"dev", "proc", "sys", "root"} {
		c.dir(d, 0o755)
	}
	c.charDev("dev/console", 0o600, 5, 1)
	if err := addFile(c, "init", 0o755, init); err != nil {
		return err
	}

	dirs := map[string]bool{}
	var manifest strings.Builder
	for _, m := range modules {
		name := path.Join("lib/modules", k.Release, m.Path)
		addParents(c, dirs, path.Dir(name))
		if err := addFile(c, name, 0o644, filepath.Join(k.Modules, m.Path)); err != nil {
			return err
		}
		manifest.WriteString("/" + name + "\n")
	}
	c.file(strings.TrimPrefix(guest.InitramfsManifest, "/"), 0o644,
		strings.NewReader(manifest.String()), int64(manifest.Len()))
	return c.close()
}

// addParents adds dir and its missing parents, parents first, as the
// kernel creates nothing implicitly.
func addParents(c *cpioWriter, done map[string]bool, dir string) {
	if dir == "." || dir == "/" || done[dir] {
		return
	}
	addParents(c, done, path.Dir(dir))
	c.dir(dir, 0o755)
	done[dir] = true
}

func addFile(c *cpioWriter, name string, perm uint32, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("initramfs: %s is not a regular file", src)
	}
	c.file(name, perm, f, fi.Size())
	return nil
}
