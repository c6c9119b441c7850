package dminit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containerd/go-dmverity/pkg/dm"
	"golang.org/x/sys/unix"
)

// mapperDir is where udev would link each device's name to its node.
const mapperDir = "/dev/mapper"

// Create creates the devices that do not exist yet, in order, stopping at
// the first that fails as the kernel does, and links /dev/mapper/NAME to
// each device's node, as udev would. The block devices their tables name
// must exist (see BlockDevices) and device-mapper and the targets must be
// loaded (see Modules). warnf reports what kiln-init does differently from
// the kernel.
func (s Spec) Create(warnf func(format string, args ...any)) error {
	if len(s.Devices) == 0 {
		return nil
	}
	ctl, err := dm.Open()
	if err != nil {
		return fmt.Errorf("%s: device-mapper is not available (the kernel needs dm-mod, built in or loaded from the initramfs): %w",
			ParamCreate, err)
	}
	defer ctl.Close()
	for _, d := range s.Devices {
		if err := ensure(ctl, d, warnf); err != nil {
			return fmt.Errorf("%s: device %q: %w", ParamCreate, d.Name, err)
		}
	}
	return nil
}

// ensure creates d unless the kernel did (CONFIG_DM_INIT), and links its
// name to its node.
func ensure(ctl *dm.Control, d Device, warnf func(string, ...any)) error {
	st, err := ctl.DeviceStatus(d.Name)
	switch {
	case errors.Is(err, unix.ENXIO):
		if err := create(ctl, d, warnf); err != nil {
			return err
		}
		if st, err = ctl.DeviceStatus(d.Name); err != nil {
			return err
		}
	case err != nil:
		return err
	case !st.ActivePresent:
		return errors.New("exists without an active table")
	}
	return link(d.Name, st.Minor)
}

// create creates d and activates its table, or removes it again.
func create(ctl *dm.Control, d Device, warnf func(string, ...any)) error {
	// go-dmverity loads every table read-only and cannot choose a uuid
	// or minor.
	if !d.ReadOnly {
		return errors.New("rw: kiln-init creates read-only devices only")
	}
	if d.UUID != "" {
		warnf("%s: device %q: kiln-init cannot set its uuid %s; it has none", ParamCreate, d.Name, d.UUID)
	}
	dev, err := ctl.CreateDevice(d.Name)
	if err != nil {
		return err
	}
	if err := activate(ctl, d, dev); err != nil {
		_ = ctl.RemoveDevice(d.Name)
		return err
	}
	return nil
}

func activate(ctl *dm.Control, d Device, dev uint64) error {
	if minor := unix.Minor(dev); d.HasMinor && minor != d.Minor {
		return fmt.Errorf("it got minor %d, not %d: kiln-init cannot choose minors", minor, d.Minor)
	}
	if err := ctl.LoadTable(d.Name, d.Targets); err != nil {
		return fmt.Errorf("%w (the kernel's device-mapper messages say why)", err)
	}
	return ctl.SuspendDevice(d.Name, false) // resume: make the table live
}

// link makes /dev/mapper/name point to the device's node, dm-MINOR.
func link(name string, minor uint32) error {
	if err := os.MkdirAll(mapperDir, 0o755); err != nil {
		return err
	}
	target := "../dm-" + strconv.FormatUint(uint64(minor), 10)
	err := os.Symlink(target, filepath.Join(mapperDir, name))
	if errors.Is(err, os.ErrExist) {
		return nil
	}
	return err
}
