// Package overlayroot composes kiln-init's root filesystem from the image,
// attached read-only, and a container's own scratch disk: an overlayfs whose
// lower layer is the image and whose upper layer and work directory live on
// the scratch disk (guest.ScratchUpper and guest.ScratchWork), so that
// whatever the container writes lands on its scratch disk, survives a
// reboot, and never changes the image.
//
// The scratch disk is chosen on the kernel command line with
//
//	kiln.overlay=/dev/vdb          a device
//	kiln.overlay=LABEL=NAME        the ext4 filesystem labelled NAME
//	kiln.overlay=off               no overlay, even if a scratch disk is attached
//
// and without kiln.overlay= it is the block device, other than the root
// device, that holds an ext4 filesystem labelled guest.ScratchLabel, if
// there is one. A device named on the command line may take a moment to
// appear; Compose waits for it.
package overlayroot

import (
	"fmt"
	"path"
	"strings"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

// Spec says which disk is the scratch disk. The zero Spec means: look for a
// disk labelled guest.ScratchLabel, and do without an overlay if there is
// none.
type Spec struct {
	// Off turns the overlay off.
	Off bool
	// Device is a device path such as /dev/vdb.
	Device string
	// Label is an ext4 volume label.
	Label string
}

// Named reports whether the command line named the scratch disk, which
// then must exist.
func (s Spec) Named() bool { return s.Device != "" || s.Label != "" }

func (s Spec) String() string {
	switch {
	case s.Off:
		return "off"
	case s.Device != "":
		return s.Device
	case s.Label != "":
		return labelPrefix + s.Label
	}
	return labelPrefix + guest.ScratchLabel + " (discovered)"
}

const (
	labelPrefix = "LABEL="
	devPrefix   = "/dev/"
	// maxLabel is the size of the superblock's volume name field.
	maxLabel = 16
)

// FromCmdline returns the Spec that the kernel command line gives with
// kiln.overlay=, or the zero Spec when it has none.
func FromCmdline(c cmdline.Cmdline) (Spec, error) {
	v, ok := c.Lookup(guest.ParamOverlay)
	if !ok {
		return Spec{}, nil
	}
	return ParseSpec(v)
}

// ParseSpec parses the value of kiln.overlay=.
func ParseSpec(v string) (Spec, error) {
	switch {
	case v == "off":
		return Spec{Off: true}, nil
	case strings.HasPrefix(v, labelPrefix):
		label := v[len(labelPrefix):]
		if label == "" || len(label) > maxLabel {
			return Spec{}, fmt.Errorf("%s=%s: a label has 1 to %d bytes", guest.ParamOverlay, v, maxLabel)
		}
		return Spec{Label: label}, nil
	case strings.HasPrefix(v, devPrefix):
		if len(v) == len(devPrefix) || path.Clean(v) != v {
			return Spec{}, fmt.Errorf("%s=%s: not a device path", guest.ParamOverlay, v)
		}
		return Spec{Device: v}, nil
	}
	return Spec{}, fmt.Errorf("%s=%q: want a device (%svdb), %sNAME or off",
		guest.ParamOverlay, v, devPrefix, labelPrefix)
}
