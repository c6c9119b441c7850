package snapshotter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/workdir"
)

// Container modes: how a container's writable filesystem is made.
const (
	// ModeOverlay gives a container a small scratch ext4 of its own whose
	// upper/ and work/ directories overlay the image's shared disk, which
	// stays read-only: a container costs the same whatever the image's
	// size. runc gets the overlay through containerd's mount manager; a
	// microVM attaches both disks and kiln-init composes the overlay.
	ModeOverlay = "overlay"
	// ModeCopy gives a container one bootable, writable copy of the
	// image's disk (a reflink where the host's filesystem can), for shims
	// that take a single disk.
	ModeCopy = "copy"
)

// Labels a client sets on a container's snapshot. containerd passes a
// snapshot's labels on to kiln only when they start with
// "containerd.io/snapshot/".
const (
	// LabelContainerMode chooses the container mode ("overlay" or "copy")
	// for one container, over the configured default.
	LabelContainerMode = "containerd.io/snapshot/kiln.container-mode"
	// LabelImage names the image a container is made from, in the
	// container's namespace. With the init piece injected, kiln writes
	// that image's config into the container's disk; without the label it
	// is the config the images whose layers make the parent agree on.
	LabelImage = "containerd.io/snapshot/kiln.image"
)

// ValidMode checks a container mode.
func ValidMode(mode string) error {
	switch mode {
	case ModeOverlay, ModeCopy:
		return nil
	}
	return fmt.Errorf("container mode %q: want %q or %q", mode, ModeOverlay, ModeCopy)
}

// containerRequest describes the writable part of a new container.
type containerRequest struct {
	mode string
	// size is the container's size: the scratch disk's in overlay mode,
	// the whole disk's in copy mode (0: the disk's own size).
	size int64
	// disk is the parent's disk ("" for a container without a parent).
	disk string
	// config is the image config to write into the container's disk,
	// when the parent's disk was built with the init piece.
	config []byte
}

// containerMaker makes containers' writable disks.
type containerMaker struct {
	root        string
	defaultSize int64

	// mu is held to read when a template is copied, to write when one is
	// made or removed.
	mu sync.RWMutex
}

// make fills dir, a new directory that becomes the container's, with the
// container's writable disk.
func (c *containerMaker) make(ctx context.Context, dir string, req containerRequest) error {
	if req.disk == "" {
		// Nothing to overlay: the container is one empty filesystem.
		size := req.size
		if size == 0 {
			size = c.defaultSize
		}
		return c.format(ctx, filepath.Join(dir, containerFile), size, "", "kiln-container")
	}
	switch req.mode {
	case ModeOverlay:
		size := req.size
		if size == 0 {
			size = c.defaultSize
		}
		return c.scratch(ctx, filepath.Join(dir, scratchFile), size, req.config)
	case ModeCopy:
		file := filepath.Join(dir, containerFile)
		if err := clone.File(req.disk, file, 0o600); err != nil {
			return fmt.Errorf("copying the image's disk: %w", err)
		}
		if req.config != nil {
			if err := c.withFile(file, func(f *os.File, wd string) error {
				return inject.StampConfig(ctx, f, req.config, "", build.Epoch, wd)
			}); err != nil {
				return err
			}
		}
		if req.size > 0 {
			if err := ext4.Resize(ctx, file, req.size); err != nil {
				return fmt.Errorf("%s: %w", snapshots.LabelSnapshotMaxSize, err)
			}
		}
		return nil
	}
	return fmt.Errorf("%w: %w", ValidMode(req.mode), errdefs.ErrInvalidArgument)
}

// withFile opens file for reading and writing and gives fn a work
// directory too.
func (c *containerMaker) withFile(file string, fn func(f *os.File, workDir string) error) error {
	wd, err := workdir.New(filepath.Join(c.root, tmpDir))
	if err != nil {
		return err
	}
	defer wd.Release()
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = fn(f, wd.Path)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (c *containerMaker) format(ctx context.Context, file string, size int64, label, identity string) error {
	wd, err := workdir.New(filepath.Join(c.root, tmpDir))
	if err != nil {
		return err
	}
	defer wd.Release()
	return ext4.Format(ctx, file, size, label, identity, wd.Path)
}

// maxTemplates bounds the scratch templates kept: one per size and image
// config in use.
const maxTemplates = 32

// scratch writes a new scratch disk of size bytes to dst: a copy of a
// template made once (the copy costs its few hundred KiB of metadata),
// holding the filesystem, and the image's config in upper/ when there is
// one.
func (c *containerMaker) scratch(ctx context.Context, dst string, size int64, config []byte) error {
	name := "scratch-" + strconv.FormatInt(size, 10)
	if config != nil {
		sum := sha256.Sum256(config)
		name += "-" + hex.EncodeToString(sum[:8])
	}
	tmpl := filepath.Join(c.root, templatesDir, name+".ext4")
	for {
		c.mu.RLock()
		if exists(tmpl) {
			now := time.Now()
			os.Chtimes(tmpl, now, now) //nolint:errcheck // only the pruning order
			err := clone.File(tmpl, dst, 0o600)
			c.mu.RUnlock()
			if err != nil {
				return fmt.Errorf("copying the scratch disk template: %w", err)
			}
			return nil
		}
		c.mu.RUnlock()
		if err := c.makeTemplate(ctx, tmpl, size, config); err != nil {
			return err
		}
	}
}

// makeTemplate makes a scratch template, removing the least recently
// used ones beyond maxTemplates.
func (c *containerMaker) makeTemplate(ctx context.Context, file string, size int64, config []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if exists(file) {
		return nil
	}
	dir := filepath.Dir(file)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	c.prune(dir)
	// Made in a work directory, which goes with whatever an interrupted
	// kiln left of it.
	wd, err := workdir.New(filepath.Join(c.root, tmpDir))
	if err != nil {
		return err
	}
	defer wd.Release()
	tmp := filepath.Join(wd.Path, filepath.Base(file))
	if err := ext4.Format(ctx, tmp, size, guest.ScratchLabel, filepath.Base(file), wd.Path); err != nil {
		return fmt.Errorf("making a scratch disk: %w", err)
	}
	if config != nil {
		err := c.withFile(tmp, func(f *os.File, wd string) error {
			return inject.StampConfig(ctx, f, config, "/"+guest.ScratchUpper, build.Epoch, wd)
		})
		if err != nil {
			return err
		}
	}
	return os.Rename(tmp, file)
}

// prune removes the least recently used templates beyond maxTemplates.
// Called with mu held to write.
func (c *containerMaker) prune(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) < maxTemplates {
		return
	}
	type used struct {
		name string
		at   int64
	}
	var all []used
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			all = append(all, used{e.Name(), fi.ModTime().UnixNano()})
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at < all[j].at })
	for _, u := range all[:len(all)-maxTemplates+1] {
		os.Remove(filepath.Join(dir, u.name))
	}
}
