// Command kiln-init is PID 1 for microVMs booted from OCI images that have
// no init system of their own. The kernel starts it with init=/.kiln/init.
//
// It mounts the API filesystems, sets the hostname, configures the network
// and DNS from the kernel command line (ip=, kiln.dns=, kiln.hostname=),
// starts /.kiln/agent in the background when present, then runs the image's
// Entrypoint and Cmd from /.kiln/image-config.json as the image's User, on
// the console. Arguments the kernel passes to init (the words after "--" on
// the kernel command line) replace the image's Cmd, like the arguments of
// "docker run IMAGE ARGS...".
//
// When the workload exits kiln-init prints one line,
//
//	kiln-init: workload exited with status N
//	kiln-init: workload killed by signal SIGNAME
//
// stops the remaining processes, syncs and powers the machine off.
//
// SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to the
// workload; Ctrl-Alt-Del arrives as SIGINT. SIGRTMIN+4 and SIGRTMIN+5
// (signals 38 and 39, as systemd numbers them; kiln-agent sends them) stop
// the workload with SIGTERM, killing it after 10s, then power off or
// reboot.
//
// Before any of that, kiln-init can give the image, attached read-only, a
// writable overlay root whose upper layer is a container's scratch disk
// (see package overlayroot):
//
//	kiln.overlay=/dev/vdb        the scratch disk; or LABEL=NAME
//	kiln.overlay=off             never compose an overlay
//
// Without kiln.overlay= a disk holding an ext4 filesystem labelled
// kiln-scratch is used when there is one. On success it prints
//
//	kiln-init: root is an overlay of /dev/vda (read-only) and /dev/vdb (scratch)
//
// An image with an init of its own can boot through kiln-init for the
// overlay alone: when the image has no /.kiln/image-config.json, kiln-init
// execs /sbin/init (or /lib/systemd/systemd), keeping PID 1 and passing its
// arguments on. kiln.init=PATH names that init instead, and wins over an
// image config.
//
// As the /init of the initramfs that kiln boot builds when the kernel needs
// modules first (overlay.ko, the virtio-blk chain, device-mapper), kiln-init
// loads them, creates the devices of dm-mod.create= that the kernel did not
// create itself (a kernel without CONFIG_DM_INIT; see package dminit),
// mounts root= (rootfstype=, rootflags=, ro or rw) and execs init=, which
// is kiln-init again on the real root (see package switchroot). A verity
// root boots with
//
//	dm-mod.create="vroot,,,ro,0 SECTORS verity 1 /dev/vda /dev/vda ..." root=/dev/dm-0 ro
//
// on kernels with and without CONFIG_DM_INIT alike.
//
// Errors are "kiln-init: error: ..." lines followed by a status line and a
// power-off, never a kernel panic.
//
// With --network-only, run by kiln-network.service on systemd images, it
// only applies the network, DNS and hostname configuration and exits.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime/debug"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
	"github.com/kilnfs/kiln/internal/guest/initconfig"
	"github.com/kilnfs/kiln/internal/guest/initproc"
	"github.com/kilnfs/kiln/internal/guest/netconf"
	"github.com/kilnfs/kiln/internal/guest/overlayroot"
	"github.com/kilnfs/kiln/internal/guest/power"
	"github.com/kilnfs/kiln/internal/guest/switchroot"
)

// How long the remaining processes get to exit on SIGTERM before shutdown.
const stopAllGrace = 3 * time.Second

func main() {
	if os.Getpid() == 1 {
		// As PID 1 every argument belongs to the workload.
		runInit(os.Args[1:])
		return // not reached: runInit never returns
	}

	fs := flag.NewFlagSet("kiln-init", flag.ContinueOnError)
	networkOnly := fs.Bool("network-only", false,
		"apply the network, DNS and hostname settings from the kernel command line and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: kiln-init --network-only\n\n"+
			"kiln-init runs as PID 1 (init=%s); other processes may only use:\n", guest.InitPath)
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if !*networkOnly || fs.NArg() > 0 {
		fs.Usage()
		os.Exit(2)
	}
	if err := setupNetwork(); err != nil {
		logf("error: %v", err)
		os.Exit(1)
	}
}

// logf writes one kiln-init line to stderr, which is the console for PID 1.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kiln-init: "+format+"\n", args...)
}

func warnf(format string, args ...any) { logf("warning: "+format, args...) }

// setupNetwork applies the hostname, network and DNS configuration from the
// kernel command line.
func setupNetwork() error {
	c, err := cmdline.Read()
	if err != nil {
		warnf("%v", err)
	}
	cfg, cfgErr := netconf.FromCmdline(c)
	if cfgErr != nil {
		// Still bring up lo and set the hostname from the image.
		cfg = netconf.Config{}
	}
	setupErr := netconf.Setup(cfg, netconf.Options{Root: "/", RunDir: guest.RunDir, Warnf: warnf})
	if cfgErr != nil {
		return fmt.Errorf("network: %w", cfgErr)
	}
	if setupErr != nil {
		return fmt.Errorf("network: %w", setupErr)
	}
	return nil
}

// runInit is PID 1. It never returns: the kernel panics if PID 1 exits.
func runInit(args []string) {
	action := initproc.PowerOff
	var root *overlayroot.Root
	defer func() {
		if r := recover(); r != nil {
			logf("error: internal error: %v\n%s", r, debug.Stack())
			shutdown(nil, initproc.PowerOff, root)
		}
	}()

	if switchroot.InInitramfs() {
		err := switchroot.Run(args, warnf)
		failBoot(fmt.Errorf("initramfs: %w", err), nil)
	}

	// /proc first: the kernel command line says how to prepare the root.
	initproc.Mounts("/", []initproc.Mount{initproc.ProcMount}, warnf)
	c, err := cmdline.Read()
	if err != nil {
		warnf("%v", err)
	}
	root, err = composeRoot(c)
	if err != nil {
		failBoot(fmt.Errorf("overlay root: %w", err), root)
	}
	if root != nil {
		logf("root is %s", root)
	}
	if path, err := initconfig.ImageInit("/", c.Get(guest.ParamInit)); err != nil {
		failBoot(err, root)
	} else if path != "" {
		failBoot(execImageInit(path, args), root)
	}

	initproc.MountAPIFilesystems("/", initproc.APIMounts, warnf)
	console := initproc.Console()
	sup := initproc.NewSupervisor(logf)
	if power.InInitialPIDNamespace() {
		// Make Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) send SIGINT to
		// PID 1, which stops the workload, instead of an immediate reset
		// without sync.
		if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
			warnf("disable Ctrl-Alt-Del reset: %v", err)
		}
	}

	if err := setupNetwork(); err != nil {
		logf("error: %v", err)
	}
	startAgent(sup, console)

	proc, err := initconfig.Load("/", args)
	if err == nil {
		err = initproc.PrepareWorkingDir(proc.Dir)
	}
	if err != nil {
		logf("error: %v", err)
		logf("%s", initproc.FailureLine(initconfig.ExitStatus(err)))
	} else {
		var ws unix.WaitStatus
		ws, action, err = sup.Run(initproc.Command(proc, console))
		if err != nil {
			err = initproc.StartError(proc.Path, err)
			logf("error: %v", err)
			logf("%s", initproc.FailureLine(initconfig.ExitStatus(err)))
		} else {
			logf("%s", initproc.StatusLine(ws))
		}
	}
	shutdown(sup, action, root)
}

// composeRoot makes the root an overlay of the image and the machine's
// scratch disk, if it has one. In a container the runtime made the root
// and there is nothing to do.
func composeRoot(c cmdline.Cmdline) (*overlayroot.Root, error) {
	if !power.InInitialPIDNamespace() {
		return nil, nil
	}
	spec, err := overlayroot.FromCmdline(c)
	if err != nil {
		return nil, err
	}
	return overlayroot.Compose(overlayroot.Options{Spec: spec, Dir: guest.Dir})
}

// execImageInit replaces kiln-init with the image's own init, which stays
// PID 1 and gets kiln-init's arguments. It returns only on failure.
func execImageInit(path string, args []string) error {
	logf("starting the image's init %s", path)
	err := unix.Exec(path, append([]string{path}, args...), os.Environ())
	return initproc.StartError(path, err)
}

// failBoot reports an error that ends the boot before any workload ran,
// with the status line hosts look for, and powers off. It never returns.
func failBoot(err error, root *overlayroot.Root) {
	logf("error: %v", err)
	logf("%s", initproc.FailureLine(initconfig.ExitStatus(err)))
	// Powering off needs /proc and /sys, which the new root may lack.
	initproc.Mounts("/", []initproc.Mount{initproc.ProcMount, initproc.SysMount}, func(string, ...any) {})
	shutdown(nil, initproc.PowerOff, root)
}

// startAgent runs /.kiln/agent in the background when the image has it:
// without systemd, nothing else would start it.
func startAgent(sup *initproc.Supervisor, console *os.File) {
	if _, err := os.Stat(guest.AgentPath); err != nil {
		return
	}
	cmd := exec.Command(guest.AgentPath)
	cmd.Env = []string{"PATH=" + initconfig.DefaultPath, "HOME=/root", "TERM=" + initconfig.DefaultTerm}
	cmd.Dir = "/"
	// Its errors go to the console; it has no terminal of its own.
	cmd.Stderr = console
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := sup.StartBackground("kiln-agent", cmd); err != nil {
		warnf("%v", err)
	}
}

// shutdown stops every process, makes the root filesystem (and the scratch
// disk below an overlay root) consistent and powers off or reboots. It never
// returns.
func shutdown(sup *initproc.Supervisor, action initproc.Action, root *overlayroot.Root) {
	if sup != nil {
		sup.StopAll(stopAllGrace)
		sup.Close()
	}
	syscall.Sync()
	// Only on a real machine: in a container / is not ours to remount.
	if power.InInitialPIDNamespace() {
		if err := initproc.RemountRootReadOnly(); err != nil {
			warnf("%v", err)
		}
		if err := root.Close(); err != nil {
			warnf("%v", err)
		}
	}
	var err error
	if action == initproc.Reboot {
		err = power.Reboot()
	} else {
		err = power.Off(warnf)
	}
	logf("error: cannot stop the machine: %v", err)
	power.Hang()
}
