package overlayroot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
)

// blockDevice is a block device as sysfs lists it.
type blockDevice struct {
	name string // its path under /dev, e.g. "nvme1n1"
	dev  uint64 // its device number
}

func (d blockDevice) path() string { return devPrefix + d.name }

// blockDevices lists the block devices, disks and partitions alike, from a
// sysfs mounted at sys.
func blockDevices(sys string) ([]blockDevice, error) {
	dir := filepath.Join(sys, "class", "block")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var devs []blockDevice
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name(), "dev"))
		if err != nil {
			continue // gone meanwhile
		}
		major, minor, ok := strings.Cut(strings.TrimSpace(string(data)), ":")
		maj, err1 := strconv.ParseUint(major, 10, 32)
		min, err2 := strconv.ParseUint(minor, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			continue
		}
		devs = append(devs, blockDevice{
			// sysfs spells a "/" in a device name as "!".
			name: strings.ReplaceAll(e.Name(), "!", "/"),
			dev:  unix.Mkdev(uint32(maj), uint32(min)),
		})
	}
	return devs, nil
}

// errNotFound means that no device matches the Spec yet.
var errNotFound = errors.New("not found")

// locate finds the scratch device for spec among the block devices of a
// sysfs mounted at sys, whose nodes are in dev, leaving out the root
// device. It returns errNotFound if none matches (yet).
func locate(spec Spec, sys, dev string, root uint64) (blockDevice, error) {
	devs, err := blockDevices(sys)
	if err != nil {
		return blockDevice{}, err
	}
	if spec.Device != "" {
		for _, d := range devs {
			if d.path() != spec.Device {
				continue
			}
			if d.dev == root {
				return blockDevice{}, fmt.Errorf("%s is the root device", spec.Device)
			}
			if _, err := os.Stat(filepath.Join(dev, d.name)); err != nil {
				return blockDevice{}, errNotFound // the node is not there yet
			}
			return d, nil
		}
		return blockDevice{}, errNotFound
	}

	want := spec.Label
	if want == "" {
		want = guest.ScratchLabel
	}
	var found []blockDevice
	for _, d := range devs {
		if d.dev == root {
			continue
		}
		label, ok, err := readDeviceLabel(filepath.Join(dev, d.name))
		if err == nil && ok && label == want {
			found = append(found, d)
		}
	}
	switch len(found) {
	case 0:
		return blockDevice{}, errNotFound
	case 1:
		return found[0], nil
	}
	names := make([]string, len(found))
	for i, d := range found {
		names[i] = d.path()
	}
	return blockDevice{}, fmt.Errorf("%s and %s are both labelled %q; choose one with %s=",
		strings.Join(names[:len(names)-1], ", "), names[len(names)-1], want, guest.ParamOverlay)
}

// readDeviceLabel reads the ext4 label of the device or file at path.
func readDeviceLabel(path string) (label string, ok bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", false, err
	}
	defer f.Close()
	return ReadLabel(f)
}

// deviceName returns the /dev path of the block device numbered dev, or ""
// if sysfs does not list it.
func deviceName(devs []blockDevice, dev uint64) string {
	for _, d := range devs {
		if d.dev == dev {
			return d.path()
		}
	}
	return ""
}
