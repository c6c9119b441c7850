package snapshotter

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Loop device roles: which file of a snapshot a device is for.
const (
	loopDisk      = "disk"      // the parent's disk, read-only (views, overlay containers)
	loopScratch   = "scratch"   // an overlay container's scratch disk
	loopContainer = "container" // a copy-mode container's disk
)

// loops manages the loop devices of block-device mode. Each snapshot
// records the devices kiln attached for it in loop.<role> files in its
// directory, so a device survives a restart of kiln (a VM may be using
// it) and is detached when the snapshot goes.
//
// kiln only ever detaches devices it attached: containerd's mount manager
// attaches loop devices to the same files when it mounts a container for
// runc, and a user may attach their own. A device kiln attaches carries
// its mark in the device's file name field ("kiln:<snapshot>:<role>"),
// so that one attached by a kiln that died before recording it is still
// known as kiln's at the next start.
type loops struct {
	mu sync.Mutex
	// attached counts the devices kiln attached and has not detached.
	attached int
}

const loopMarkPrefix = "kiln:"

func loopRecord(dir, role string) string { return filepath.Join(dir, "loop."+role) }

func loopMark(dir, role string) string { return loopMarkPrefix + filepath.Base(dir) + ":" + role }

// attach returns the loop device for file, attaching one if the snapshot
// has none for this role.
func (l *loops) attach(ctx context.Context, dir, role, file string, readOnly bool) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	record := loopRecord(dir, role)
	if b, err := os.ReadFile(record); err == nil {
		dev := strings.TrimSpace(string(b))
		if backingFile(dev) == file && deviceMark(dev) == loopMark(dir, role) {
			return dev, nil
		}
	}
	f, err := mount.SetupLoop(file, mount.LoopParams{Readonly: readOnly})
	if err != nil {
		return "", fmt.Errorf("attaching a loop device to %s: %w", file, err)
	}
	dev := f.Name()
	err = setMark(f, loopMark(dir, role))
	f.Close()
	if err == nil {
		err = os.WriteFile(record, []byte(dev+"\n"), 0o600)
	}
	if err != nil {
		mount.DetachLoopDevice(dev) //nolint:errcheck // best effort
		return "", fmt.Errorf("attaching a loop device to %s: %w", file, err)
	}
	l.attached++
	log.G(ctx).WithFields(log.Fields{"device": dev, "file": file}).Debug("attached loop device")
	return dev, nil
}

// detachDir detaches the devices a snapshot directory records, if kiln
// attached them.
func (l *loops) detachDir(ctx context.Context, dir string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	records, _ := filepath.Glob(filepath.Join(dir, "loop.*"))
	for _, r := range records {
		b, err := os.ReadFile(r)
		if err != nil {
			continue
		}
		dev := strings.TrimSpace(string(b))
		id := strings.TrimPrefix(filepath.Base(dir), removingPrefix)
		if !strings.HasPrefix(deviceMark(dev), loopMarkPrefix+id+":") {
			continue // detached meanwhile, and maybe reused by somebody else
		}
		if err := mount.DetachLoopDevice(dev); err != nil {
			log.G(ctx).WithError(err).WithField("device", dev).Warn("failed to detach loop device")
			continue
		}
		l.attached--
		os.Remove(r)
	}
}

// settle runs at startup: it counts the recorded devices and detaches
// the devices kiln attached that no snapshot records any more (kiln died
// before recording one, or while removing its snapshot).
func (l *loops) settle(ctx context.Context, root string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	records, _ := filepath.Glob(filepath.Join(root, snapshotsDir, "*", "loop.*"))
	recorded := map[string]string{} // device: record
	for _, r := range records {
		if strings.HasPrefix(filepath.Base(filepath.Dir(r)), removingPrefix) {
			continue
		}
		if b, err := os.ReadFile(r); err == nil {
			recorded[strings.TrimSpace(string(b))] = r
		}
	}
	prefix := filepath.Join(root, snapshotsDir) + string(os.PathSeparator)
	lazyPrefix := filepath.Join(root, lazyDir) + string(os.PathSeparator)
	devs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range devs {
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p)))
		file, r := backingFile(dev), recorded[dev]
		// A lazily loaded disk's: once its mount is detached, the
		// kernel names its file from within that mount.
		lazy := strings.HasPrefix(file, lazyPrefix) || r != "" && !strings.HasPrefix(file, root+string(os.PathSeparator))
		if !strings.HasPrefix(file, prefix) && !lazy || !strings.HasPrefix(deviceMark(dev), loopMarkPrefix) {
			continue // not kiln's
		}
		if r != "" && lazy {
			// A lazily loaded disk's mount died with the kiln that
			// served it: the device reads nothing any more, and the
			// disk gets a new one when next needed.
			os.Remove(r)
		} else if r != "" {
			l.attached++
			continue
		}
		if err := mount.DetachLoopDevice(dev); err != nil {
			log.G(ctx).WithError(err).WithField("device", dev).Warn("failed to detach a stale loop device")
			continue
		}
		log.G(ctx).WithFields(log.Fields{"device": dev, "file": file}).Info("detached a loop device of a removed snapshot")
	}
}

// count returns how many loop devices kiln has attached.
func (l *loops) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.attached
}

// setMark writes kiln's mark into a loop device's file name field.
func setMark(dev *os.File, mark string) error {
	info, err := unix.IoctlLoopGetStatus64(int(dev.Fd()))
	if err != nil {
		return err
	}
	info.File_name = [unix.LO_NAME_SIZE]uint8{}
	copy(info.File_name[:], mark)
	return unix.IoctlLoopSetStatus64(int(dev.Fd()), info)
}

// deviceMark returns a loop device's file name field ("" if it has no
// backing file or cannot be read).
func deviceMark(dev string) string {
	f, err := os.Open(dev)
	if err != nil {
		return ""
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return ""
	}
	name := info.File_name[:]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name)
}

// backingFile returns the file behind a loop device ("" if none).
func backingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
}

// loopUsers returns the loop devices backed by file, whoever attached
// them: a container's disk behind one is in use.
func loopUsers(file string) []string {
	var out []string
	devs, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range devs {
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p)))
		if backingFile(dev) == file {
			out = append(out, dev)
		}
	}
	return out
}
