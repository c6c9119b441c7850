package vmboot

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/log"

	"github.com/kilnfs/kiln/internal/vmboot/tsc"
)

// Guest-visible names the command line relies on.
const (
	rootDevice = "/dev/nvme0n1" // the only NVMe namespace
	consoleTTY = "ttyS0"
	// The second ISA serial port: I/O 0x2f8, IRQ 3, ttyS1 in the guest.
	agentSerial = "index=1"
)

// maxKernelCmdline is COMMAND_LINE_SIZE on x86 less the terminating NUL;
// the kernel silently truncates anything longer.
const maxKernelCmdline = 2047

// maxInitArgs leaves room for argv[0] within the kernel's default
// CONFIG_INIT_ENV_ARG_LIMIT of 32.
const maxInitArgs = 30

// Command returns the QEMU command line (binary first) that Start runs for
// cfg, less the -initrd option that Start adds when cfg.Modules need an
// initramfs. The binary is not looked up in PATH and no file is checked.
func Command(cfg Config) ([]string, error) { return command(cfg, "") }

// command is Command with the initramfs at initrd, if not empty.
func command(cfg Config, initrd string) ([]string, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("invalid VM config: %w", err)
	}
	cmdline, err := kernelCmdline(cfg)
	if err != nil {
		return nil, fmt.Errorf("invalid VM config: %w", err)
	}

	args := []string{
		cfg.QEMU,
		// Only the devices asked for below, and no host-wide QEMU config.
		"-nodefaults",
		"-no-user-config",
		"-accel", cfg.Accel,
	}
	if cfg.Accel == AccelKVM {
		args = append(args, "-cpu", "host")
	}
	args = append(args,
		// microvm has no PCI by default; pcie=on adds the host bridge the
		// NVMe disk sits on, rtc=on gives the guest wall-clock time.
		"-machine", "microvm,pcie=on,rtc=on",
		"-m", strconv.Itoa(cfg.MemoryMiB),
		"-smp", strconv.Itoa(cfg.CPUs),
		"-display", "none",
		// Guest power off, reboot and panic all end QEMU.
		"-no-reboot",
		"-kernel", cfg.Kernel,
	)
	if initrd != "" {
		args = append(args, "-initrd", initrd)
	}
	args = append(args,
		"-chardev", "file,id=console,path="+optValue(cfg.ConsoleLog),
		"-serial", "chardev:console",
	)
	if cfg.AgentSocket != "" {
		// microvm creates a single ISA serial port however many -serial
		// options are given, so the agent port is added as a device.
		args = append(args,
			"-chardev", "socket,id=agent,path="+optValue(cfg.AgentSocket)+",server=on,wait=on",
			"-device", "isa-serial,chardev=agent,"+agentSerial,
		)
	}
	drive := "file=" + optValue(cfg.Rootfs) + ",if=none,id=rootfs,format=raw"
	if cfg.ReadOnly {
		drive += ",readonly=on"
	}
	args = append(args,
		"-drive", drive,
		// virtio-blk is a module in distribution kernels; NVMe is built in.
		"-device", "nvme,drive=rootfs,serial=rootfs",
	)
	// One controller each: the guest numbers them in the order given.
	for i, d := range cfg.Disks {
		id := fmt.Sprintf("disk%d", i+1)
		drive := "file=" + optValue(d.Path) + ",if=none,id=" + id + ",format=raw"
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		args = append(args, "-drive", drive, "-device", "nvme,drive="+id+",serial="+id)
	}
	args = append(args, "-append", cmdline)
	return args, nil
}

// optValue escapes a value for QEMU's comma-separated option syntax.
func optValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// kernelCmdline builds the guest kernel command line.
func kernelCmdline(cfg Config) (string, error) {
	mode := "rw"
	if cfg.ReadOnly {
		mode = "ro"
	}
	params := []string{
		"console=" + consoleTTY,
		"root=" + rootDevice,
		"rootfstype=ext4",
		mode,
		// Reboot at once on panic; with -no-reboot that ends QEMU rather
		// than leaving a dead guest running until the timeout.
		"panic=-1",
	}
	if cfg.Accel == AccelTCG {
		params = append(params, tcgClockParams()...)
	}
	if cfg.Init != "" {
		params = append(params, "init="+cfg.Init)
	}
	// After kiln's own parameters, so that the caller's override them.
	for _, p := range cfg.Append {
		q, err := quoteKernelParam(p)
		if err != nil {
			return "", fmt.Errorf("kernel parameter: %w", err)
		}
		params = append(params, q)
	}
	if len(cfg.InitArgs) > maxInitArgs {
		return "", fmt.Errorf("%d init arguments, the kernel passes at most %d", len(cfg.InitArgs), maxInitArgs)
	}
	if len(cfg.InitArgs) > 0 {
		params = append(params, "--")
		for _, a := range cfg.InitArgs {
			q, err := quoteKernelArg(a)
			if err != nil {
				return "", fmt.Errorf("init argument: %w", err)
			}
			params = append(params, q)
		}
	}
	cmdline := strings.Join(params, " ")
	if len(cmdline) > maxKernelCmdline {
		return "", fmt.Errorf("kernel command line is %d bytes, the limit is %d", len(cmdline), maxKernelCmdline)
	}
	return cmdline, nil
}

// tcgClockParams tells an emulated guest its TSC frequency. On microvm the
// kernel can only calibrate the TSC against the PIT, which fails often under
// emulation and then hangs the boot; TCG hands the host's TSC to the guest,
// so the host can measure it instead. tsc=reliable stops the guest's clock
// watchdog from condemning the TSC because jiffies lag when the emulated CPU
// falls behind. Without a measurement the guest calibrates as usual.
func tcgClockParams() []string {
	khz, err := tsc.FrequencyKHz()
	if err != nil {
		log.L.WithError(err).Warn("cannot tell the guest its TSC frequency; the boot may hang calibrating it")
		return nil
	}
	return []string{"tsc_early_khz=" + strconv.FormatInt(khz, 10), "tsc=reliable"}
}

// quoteKernelParam quotes the value of a key=value kernel parameter if it
// holds spaces, the form the kernel's parser understands.
func quoteKernelParam(p string) (string, error) {
	if k, v, ok := strings.Cut(p, "="); ok && k != "" && !strings.ContainsAny(k, " \t\n\"") {
		q, err := quoteKernelArg(v)
		if err != nil {
			return "", err
		}
		return k + "=" + q, nil
	}
	return quoteKernelArg(p)
}

// quoteKernelArg wraps s in double quotes if it holds spaces. The kernel
// has no escape for a double quote inside a quoted word, so those are
// rejected, as are line breaks and empty words, which the kernel would drop.
func quoteKernelArg(s string) (string, error) {
	switch {
	case s == "":
		return "", errors.New("empty word")
	case strings.ContainsAny(s, "\"\n\r"):
		return "", fmt.Errorf("%q: the kernel command line cannot carry double quotes or line breaks", s)
	case strings.ContainsAny(s, " \t"):
		return `"` + s + `"`, nil
	}
	return s, nil
}

// shellQuote renders args as a command a user can paste into a shell.
func shellQuote(args []string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		if a != "" && strings.IndexFunc(a, needsQuote) < 0 {
			quoted[i] = a
			continue
		}
		quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(quoted, " ")
}

func needsQuote(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return false
	}
	return !strings.ContainsRune("-_=+:,./@%", r)
}
