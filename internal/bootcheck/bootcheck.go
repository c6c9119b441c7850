// Package bootcheck smoke-tests a root filesystem: it boots it under QEMU
// and runs something in it, the way `kiln boot` and kiln's tests do. An
// image with kiln-init runs its workload (or the given command instead of
// its Cmd) and reports its exit status; an image with kiln-agent runs the
// command through the agent on a second serial port; anything else just
// boots until it powers off.
//
// With a scratch disk the rootfs is attached read-only and kiln-init, which
// the image must have, composes an overlay root over it whose upper layer
// is the scratch disk, then runs the workload or execs the image's own init.
//
// Kernel parameters with dm-mod.create= (a verity root) boot through
// kiln-init's initramfs, which loads device-mapper and creates the devices
// when the kernel has no CONFIG_DM_INIT.
package bootcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/agent"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
	"github.com/kilnfs/kiln/internal/guest/dminit"
	"github.com/kilnfs/kiln/internal/guest/overlayroot"
	"github.com/kilnfs/kiln/internal/vmboot"
	"github.com/kilnfs/kiln/internal/vmboot/kernel"
)

// Options describe a boot.
type Options struct {
	Rootfs string
	// Kernel is a vmlinuz with ext4 and NVMe built in; empty: Debian's
	// cloud kernel, fetched with apt into CacheDir.
	Kernel   string
	CacheDir string
	// Args replace the image's Cmd (kiln-init) or are run through the
	// agent.
	Args []string
	// Writable attaches the rootfs read-write; otherwise read-only.
	Writable bool
	// Scratch is an ext4 image attached read-write as the scratch disk of
	// an overlay root (see package overlayroot); empty means none.
	Scratch   string
	Append    []string
	MemoryMiB int
	Timeout   time.Duration
	// Console receives the guest console as it is written.
	Console io.Writer
	// WorkDir holds the console log and the agent socket.
	WorkDir string
}

// Result is what the boot showed.
type Result struct {
	Mode       string // "kiln-init", "kiln-agent" or "init"
	ExitStatus int    // the workload's or the command's exit status
	Stdout     []byte // the command's output, with kiln-agent
	Stderr     []byte
	Console    string
	Duration   time.Duration
}

var statusLine = regexp.MustCompile(`kiln-init: workload (exited with status (\d+)|killed by signal \S+)`)

// Run boots the rootfs and waits for the guest to finish.
func Run(ctx context.Context, opts Options) (*Result, error) {
	im, err := ext4.OpenImage(opts.Rootfs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opts.Rootfs, err)
	}
	// The init piece brings the image config with it; /.kiln/init alone
	// is the network piece's helper on a systemd image.
	has := map[string]bool{}
	for _, p := range []string{guest.ImageConfigPath, guest.AgentPath, guest.InitPath} {
		if _, _, found, lerr := im.Lookup(p); lerr != nil {
			err = lerr
		} else {
			has[p] = found
		}
	}
	im.Close()
	if err != nil {
		return nil, err
	}
	hasInit := has[guest.ImageConfigPath]
	if opts.Scratch != "" && !has[guest.InitPath] {
		return nil, fmt.Errorf("an overlay root needs kiln-init, which %s lacks (%s): "+
			"convert the image with --inject init, or --inject agent,network for a systemd image", opts.Rootfs, guest.InitPath)
	}
	if !hasInit && has[guest.AgentPath] {
		return runAgent(ctx, opts)
	}
	cfg, err := vmConfig(ctx, opts)
	if err != nil {
		return nil, err
	}
	mode := "init"
	if hasInit {
		mode, cfg.Init, cfg.InitArgs = "kiln-init", guest.InitPath, opts.Args
	} else if len(opts.Args) > 0 {
		return nil, errors.New("the rootfs has neither kiln-init nor kiln-agent to run a command with (convert it with --inject init or agent)")
	}
	vm, err := vmboot.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	stop := follow(cfg.ConsoleLog, opts.Console)
	res, err := vm.Wait()
	stop()
	if err != nil {
		return nil, err
	}
	out := &Result{Mode: mode, Console: res.Console, Duration: res.Duration}
	if hasInit {
		m := statusLine.FindStringSubmatch(res.Console)
		if m == nil {
			return out, fmt.Errorf("kiln-init printed no exit status; the console ends with:\n%s", tail(res.Console, 20))
		}
		out.ExitStatus = 128
		if m[2] != "" {
			out.ExitStatus, _ = strconv.Atoi(m[2])
		}
	}
	return out, nil
}

// runAgent boots an image whose own init (systemd) starts kiln-agent, and
// runs the command through the agent on the second serial port.
func runAgent(ctx context.Context, opts Options) (*Result, error) {
	cfg, err := vmConfig(ctx, opts)
	if err != nil {
		return nil, err
	}
	cfg.AgentSocket = filepath.Join(opts.WorkDir, "agent.sock")
	cfg.Append = append(cfg.Append, guest.ParamAgent+"=serial:"+vmboot.GuestAgentDevice)
	vm, err := vmboot.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	stop := follow(cfg.ConsoleLog, opts.Console)
	defer stop()
	defer vm.Kill()
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		return nil, err
	}
	client := agent.NewClient(conn)
	defer client.Close()
	out := &Result{Mode: "kiln-agent"}
	readyCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-vm.Done():
			cancel()
		case <-readyCtx.Done():
		}
	}()
	if _, err := client.WaitReady(readyCtx, time.Second); err != nil {
		console, _ := vm.Console()
		return nil, fmt.Errorf("the guest agent did not answer: %w; the console ends with:\n%s", err, tail(console, 20))
	}
	if len(opts.Args) > 0 {
		r, err := client.Exec(ctx, agent.ExecRequest{Argv: opts.Args})
		if err != nil {
			return nil, err
		}
		out.ExitStatus, out.Stdout, out.Stderr = r.ExitCode, r.Stdout, r.Stderr
	}
	if err := client.Shutdown(ctx, agent.PowerOff); err != nil {
		return nil, err
	}
	res, err := vm.Wait()
	if err != nil {
		return nil, err
	}
	out.Console, out.Duration = res.Console, res.Duration
	return out, nil
}

func vmConfig(ctx context.Context, opts Options) (vmboot.Config, error) {
	k := opts.Kernel
	if k == "" {
		kern, err := kernel.Fetch(ctx, opts.CacheDir)
		if err != nil {
			return vmboot.Config{}, fmt.Errorf("no --kernel given and Debian's cloud kernel is not at hand: %w", err)
		}
		k = kern.Vmlinuz
	}
	if err := os.MkdirAll(opts.WorkDir, 0o700); err != nil {
		return vmboot.Config{}, err
	}
	cfg := vmboot.Config{
		Kernel:     k,
		Rootfs:     opts.Rootfs,
		ReadOnly:   !opts.Writable,
		Append:     []string{"quiet"},
		MemoryMiB:  opts.MemoryMiB,
		ConsoleLog: filepath.Join(opts.WorkDir, "console.log"),
		Timeout:    opts.Timeout,
	}
	if opts.Scratch != "" {
		if err := addScratch(&cfg, opts.Scratch); err != nil {
			return vmboot.Config{}, err
		}
	}
	// Last, so that the caller's parameters win.
	cfg.Append = append(cfg.Append, opts.Append...)
	if err := addDeviceMapper(&cfg); err != nil {
		return vmboot.Config{}, err
	}
	return cfg, nil
}

// addDeviceMapper boots through kiln-init's initramfs when the kernel
// parameters ask for device-mapper devices (dm-mod.create=): kiln-init
// loads device-mapper and the targets' modules and creates the devices
// that a kernel without CONFIG_DM_INIT does not.
func addDeviceMapper(cfg *vmboot.Config) error {
	spec, err := dminit.FromCmdline(cmdline.FromParams(cfg.Append...))
	if err != nil {
		return fmt.Errorf("kernel parameters: %w", err)
	}
	if len(spec.Devices) > 0 {
		cfg.Modules = append(cfg.Modules, spec.Modules()...)
		cfg.Initramfs = true
	}
	return nil
}

// addScratch attaches the scratch disk and has kiln-init, started first
// whatever the image's own init, compose the overlay root with it, with
// overlayfs loaded from an initramfs if the kernel has it as a module.
func addScratch(cfg *vmboot.Config, scratch string) error {
	f, err := os.Open(scratch)
	if err != nil {
		return fmt.Errorf("scratch disk: %w", err)
	}
	label, ok, err := overlayroot.ReadLabel(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("scratch disk %s: %w", scratch, err)
	}
	if !ok {
		return fmt.Errorf("scratch disk %s holds no ext4 filesystem; make one with: mkfs.ext4 -q -L %s %s 64M",
			scratch, guest.ScratchLabel, scratch)
	}
	cfg.Disks = append(cfg.Disks, vmboot.Disk{Path: scratch})
	if label != guest.ScratchLabel {
		// kiln-init only finds a disk by itself by its label.
		cfg.Append = append(cfg.Append, guest.ParamOverlay+"="+vmboot.DiskDevice(len(cfg.Disks)-1))
	}
	cfg.Init = guest.InitPath
	cfg.Modules = append(cfg.Modules, "overlay")
	return nil
}

// follow copies what the guest writes to its console log to w, until
// stop is called.
func follow(path string, w io.Writer) (stop func()) {
	if w == nil {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		var off int64
		buf := make([]byte, 64<<10)
		copyNew := func() {
			f, err := os.Open(path)
			if err != nil {
				return
			}
			defer f.Close()
			for {
				n, _ := f.ReadAt(buf, off)
				if n == 0 {
					return
				}
				w.Write(buf[:n]) //nolint:errcheck // best effort
				off += int64(n)
			}
		}
		for {
			copyNew()
			select {
			case <-done:
				copyNew()
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

func tail(s string, lines int) string {
	n := 0
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			n++
			if n > lines {
				return s[i+1:]
			}
		}
	}
	return s
}
