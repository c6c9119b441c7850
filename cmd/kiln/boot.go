package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/internal/bootcheck"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/workdir"
)

func newBootCommand() *cobra.Command {
	var (
		kernelPath string
		cacheDir   string
		writable   bool
		scratch    string
		appendArgs []string
		memory     int
		timeout    time.Duration
		quiet      bool
	)
	cmd := &cobra.Command{
		Use:   "boot ROOTFS.ext4 [-- COMMAND...]",
		Short: "Boot a rootfs under QEMU to check it before handing it to your VMM",
		Long: `Boot a rootfs under QEMU (microvm machine, NVMe root) and show its console.

A rootfs with kiln-init (kiln convert --inject init) runs its workload, or
COMMAND instead of the image's Cmd, and kiln boot exits with the workload's
status. A rootfs whose own init starts kiln-agent (--inject agent on a
systemd image) runs COMMAND through the agent on a second serial port and
prints its output. Anything else boots until it powers off or times out.

With --scratch FILE, an ext4 image (mkfs.ext4 -q -L kiln-scratch FILE 64M),
the rootfs is attached read-only and FILE writable, and kiln-init composes an
overlay root: the workload's writes land in FILE and persist from one boot to
the next, while the rootfs stays unchanged. The rootfs needs kiln-init for
that (--inject init, or --inject agent,network for a systemd image, whose own
init kiln-init then starts). If the kernel has overlayfs as a module, kiln
boot loads it from a small initramfs whose /init is kiln-init.

A verity disk (kiln convert --verity) boots as the root with
--append 'dm-mod.create=vroot,,,ro,TABLE' --append root=/dev/dm-0, TABLE
being the verity table of /dev/nvme0n1. Such parameters always boot through
that initramfs: kiln-init loads device-mapper and the targets' modules and
creates the devices when the kernel does not (no CONFIG_DM_INIT).

Without --kernel, Debian's cloud kernel is fetched with apt-get download into
the cache directory. The rootfs is attached read-only unless --rw.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := workdir.Private(cacheDir); err != nil {
				return fmt.Errorf("cache directory: %w", err)
			}
			work, err := os.MkdirTemp(cacheDir, "boot-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(work)
			opts := bootcheck.Options{
				Rootfs: args[0], Kernel: kernelPath, CacheDir: cacheDir, Args: args[1:],
				Writable: writable, Scratch: scratch, Append: appendArgs, MemoryMiB: memory, Timeout: timeout,
				WorkDir: work,
			}
			if !quiet {
				opts.Console = cmd.ErrOrStderr()
			}
			res, err := bootcheck.Run(cmd.Context(), opts)
			if err != nil {
				return err
			}
			os.Stdout.Write(res.Stdout) //nolint:errcheck
			os.Stderr.Write(res.Stderr) //nolint:errcheck
			fmt.Fprintf(cmd.ErrOrStderr(), "kiln boot: %s, exit status %d, %v\n", res.Mode, res.ExitStatus, res.Duration.Round(time.Millisecond))
			if res.ExitStatus != 0 {
				return exitError(res.ExitStatus)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&kernelPath, "kernel", "", "kernel (vmlinuz) with ext4 and NVMe built in (default: Debian's cloud kernel)")
	f.StringVar(&cacheDir, "cache-dir", store.DefaultDir(), "where the fetched kernel is kept")
	f.BoolVar(&writable, "rw", false, "attach the rootfs read-write (the guest can change the file)")
	f.StringVar(&scratch, "scratch", "", "ext4 image to attach writable as the upper layer of an overlay root")
	f.StringArrayVar(&appendArgs, "append", nil, "extra kernel parameter, e.g. ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off; repeatable")
	f.IntVar(&memory, "memory", 512, "guest memory in MiB")
	f.DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	f.BoolVar(&quiet, "quiet", false, "do not show the guest console")
	return cmd
}
