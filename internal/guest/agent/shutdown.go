package agent

import (
	"fmt"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/power"
)

// RequestShutdown stops the guest in an orderly way when it can: kiln-init
// as PID 1 is signalled (power.SignalPowerOff or power.SignalReboot) and
// stops the workload first; under systemd, systemctl starts poweroff.target
// or reboot.target. Otherwise, or if that fails, it syncs and powers off or
// reboots directly. It returns only on failure, or once the init has
// accepted the request.
func RequestShutdown(action ShutdownAction, logf func(string, ...any)) error {
	if pid1, err := os.Readlink("/proc/1/exe"); err == nil && pid1 == guest.InitPath {
		sig := power.SignalPowerOff
		if action == Reboot {
			sig = power.SignalReboot
		}
		if err := unix.Kill(1, sig); err == nil {
			return nil
		}
	}
	if systemdBooted() {
		if systemctl, err := exec.LookPath("systemctl"); err == nil {
			out, err := exec.Command(systemctl, "--no-block", string(action)).CombinedOutput()
			if err == nil {
				return nil
			}
			logf("systemctl %s: %v: %s", action, err, out)
		}
	}
	if action == Reboot {
		return power.Reboot()
	}
	if err := power.Off(logf); err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	return nil
}

// systemdBooted is sd_booted(3): systemd creates this directory early.
func systemdBooted() bool {
	fi, err := os.Lstat("/run/systemd/system")
	return err == nil && fi.IsDir()
}
