package initconfig

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"

	"github.com/kilnfs/kiln/internal/guest"
)

// ImageInits are the inits kiln-init looks for in an image that has no
// kiln image config, in order.
var ImageInits = []string{"/sbin/init", "/lib/systemd/systemd"}

// ImageInit returns the image's own init that kiln-init should exec, keeping
// PID 1, instead of running a workload, or "" to run the workload from the
// image config. explicit is the value of kiln.init= on the kernel command
// line; given, it wins over a config. Without it an image that has no
// config execs the first of ImageInits it has. The error says why neither
// works, with the status a shell would give.
func ImageInit(root, explicit string) (string, error) {
	if explicit != "" {
		p := path.Clean(explicit)
		switch {
		case !path.IsAbs(p):
			return "", errorf(StatusFailure, "%s=%s: not an absolute path", guest.ParamInit, explicit)
		case p == guest.InitPath:
			return "", errorf(StatusFailure, "%s=%s is kiln-init itself", guest.ParamInit, explicit)
		}
		if err := checkExecutable(root, p); err != nil {
			return "", fmt.Errorf("%s: %w", guest.ParamInit, err)
		}
		return p, nil
	}
	_, err := statInRoot(root, guest.ImageConfigPath)
	if !errors.Is(err, fs.ErrNotExist) {
		// A config, or one that Load will explain it cannot read.
		return "", nil
	}
	for _, p := range ImageInits {
		if checkExecutable(root, p) == nil {
			return p, nil
		}
	}
	return "", errorf(StatusNotFound, "the image has neither a kiln image config (%s) nor an init of its own (%s); "+
		"give one with %s=PATH", guest.ImageConfigPath, strings.Join(ImageInits, " or "), guest.ParamInit)
}
