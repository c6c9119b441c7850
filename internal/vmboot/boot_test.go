package vmboot_test

import (
	"bufio"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/verity"
	"github.com/kilnfs/kiln/internal/vmboot"
	"github.com/kilnfs/kiln/internal/vmboot/vmboottest"
)

// bootTimeout bounds each test boot. Under TCG a busybox guest reaches
// userspace in about 1.5 s, so this only matters when something hangs.
const bootTimeout = 60 * time.Second

// prologue starts every test init: /proc is needed to run busybox applets
// by name and for the sysrq power off, /dev for the serial devices.
const prologue = `#!/bin/sh
/bin/busybox mount -t proc proc /proc
mount -t devtmpfs dev /dev
`

// newConfig returns a read-only boot of a busybox rootfs running script.
func newConfig(t *testing.T, script string) vmboot.Config {
	t.Helper()
	vmboottest.RequireQEMU(t)
	k := vmboottest.Kernel(t)
	return vmboot.Config{
		Kernel:     k.Vmlinuz,
		Rootfs:     vmboottest.BusyboxRootfs(t, script),
		ReadOnly:   true,
		Init:       "/init",
		ConsoleLog: filepath.Join(t.TempDir(), "console.log"),
		Timeout:    bootTimeout,
	}
}

func TestRunPowersOff(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
echo "mount-status=$?"
echo "args=$#:$1|$2"
if touch /probe 2>/dev/null; then echo rootfs=writable; else echo rootfs=readonly; fi
echo kiln-boot-ok
`+vmboottest.PowerOff)
	cfg.InitArgs = []string{"first", "two words"}
	before := fileSum(t, cfg.Rootfs)

	res, err := vmboot.Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("booted and powered off in %s", res.Duration)
	if !res.Exited || res.ExitCode != 0 {
		t.Errorf("QEMU did not exit by itself with status 0: Exited=%v ExitCode=%d", res.Exited, res.ExitCode)
	}
	if res.Panicked {
		t.Errorf("guest kernel panicked:\n%s", res.Console)
	}
	for _, want := range []string{"kiln-boot-ok", "mount-status=0", "args=2:first|two words", "rootfs=readonly"} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console has no line %q:\n%s", want, res.Console)
		}
	}
	if after := fileSum(t, cfg.Rootfs); after != before {
		t.Error("read-only rootfs image changed during the boot")
	}
}

func TestRunReadWrite(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
echo kiln-was-here > /written && sync && echo write=ok
# Remounting read-only checkpoints the journal, so the host sees the file.
mount -o remount,ro /
`+vmboottest.PowerOff)
	cfg.ReadOnly = false

	res, err := vmboot.Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Exited || !strings.Contains(res.Console, "write=ok") {
		t.Fatalf("guest did not write to its rootfs (Exited=%v):\n%s", res.Exited, res.Console)
	}
	debugfs, err := vmboottest.SystemTool("debugfs")
	if err != nil {
		t.Skipf("debugfs not found, cannot read the image back: %v", err)
	}
	out, err := exec.Command(debugfs, "-R", "cat /written", cfg.Rootfs).Output()
	if err != nil {
		t.Fatalf("debugfs: %v", err)
	}
	if got := strings.TrimSpace(string(out)); got != "kiln-was-here" {
		t.Errorf("image has /written = %q, want %q", got, "kiln-was-here")
	}
}

// TestAgentSerial proves the second serial port: the guest writes to it,
// reads the host's reply from it and echoes that to its console.
func TestAgentSerial(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
exec 3<>`+vmboot.GuestAgentDevice+`
stty -F `+vmboot.GuestAgentDevice+` raw -echo
echo hello >&3
read reply <&3
echo "got-$reply"
`+vmboottest.PowerOff)
	cfg.AgentSocket = filepath.Join(t.TempDir(), "agent.sock")

	vm, err := vmboot.Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()

	conn, err := vm.DialAgent(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(bootTimeout)); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("reading from guest agent port: %v", err)
	}
	if line != "hello\n" {
		t.Fatalf("guest agent port sent %q, want %q", line, "hello\n")
	}
	if _, err := conn.Write([]byte("world\n")); err != nil {
		t.Fatalf("writing to guest agent port: %v", err)
	}

	if _, err := vm.WaitForLine(t.Context(), regexp.MustCompile(`got-world`), bootTimeout); err != nil {
		t.Fatal(err)
	}
	res, err := vm.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if !res.Exited {
		t.Error("QEMU did not exit by itself")
	}
}

func TestKill(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+"echo kiln-ready\nsleep 600\n")

	vm, err := vmboot.Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	if _, err := vm.WaitForLine(t.Context(), regexp.MustCompile(`kiln-ready`), bootTimeout); err != nil {
		t.Fatal(err)
	}
	vm.Kill()
	res, err := vm.Wait()
	if err != nil {
		t.Fatalf("Wait after Kill: %v", err)
	}
	if res.Exited {
		t.Error("Exited is set for a killed VM")
	}
}

func TestRunTimeout(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+"sleep 600\n")
	// Far too short to boot: the VM is killed mid-boot.
	cfg.Timeout = 500 * time.Millisecond

	res, err := vmboot.Run(t.Context(), cfg)
	if !errors.Is(err, vmboot.ErrTimeout) {
		t.Fatalf("Run error = %v, want ErrTimeout", err)
	}
	if res.Exited {
		t.Error("Exited is set for a VM killed on timeout")
	}
	// The error must let a user rerun and inspect the boot.
	for _, want := range []string{vmboot.DefaultQEMU, "-append", cfg.ConsoleLog} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("timeout error does not mention %q:\n%v", want, err)
		}
	}
}

func TestRunInitExits(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, "#!/bin/sh\necho init-leaving\nexit 1\n")

	res, err := vmboot.Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	// panic=-1 and -no-reboot turn the panic into a QEMU exit rather than
	// a hang until the timeout.
	if !res.Exited || !res.Panicked {
		t.Errorf("Exited=%v Panicked=%v, want both:\n%s", res.Exited, res.Panicked, res.Console)
	}
}

func fileSum(t *testing.T, path string) [sha256.Size]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// TestRunInitramfs boots with modules the kernel lacks and a second disk:
// kiln-init, as the initramfs's /init, loads the modules with their
// dependencies, mounts the root read-only and hands over to the real init
// with its arguments.
func TestRunInitramfs(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
mount -t sysfs sys /sys
echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
grep -qw overlay /proc/filesystems && echo overlay-available
echo "root: $(grep ' / ' /proc/mounts | grep -v rootfs | cut -d, -f1)"
echo "pid=$$ args=$#:$1"
echo "disk1-serial=$(cat /sys/class/nvme/nvme1/serial)"
ls /kiln-initramfs /lib 2>/dev/null | sed 's/^/leftover: /'
`+vmboottest.PowerOff)
	cfg.Modules = []string{"overlay", "virtio_blk", "virtio_pci"}
	cfg.InitramfsInit = vmboottest.KilnInit(t)
	cfg.InitArgs = []string{"first"}
	cfg.Disks = []vmboot.Disk{{Path: vmboottest.BusyboxRootfs(t, ""), ReadOnly: true}}

	res := bootInitramfs(t, cfg,
		"modules: overlay virtio virtio_blk virtio_pci virtio_pci_legacy_dev virtio_pci_modern_dev virtio_ring \n",
		"overlay-available",
		"root: /dev/nvme0n1 / ext4 ro\n",
		"pid=1 args=1:first",
		"disk1-serial=disk1",
	)
	if strings.Contains(res.Console, "leftover:") {
		t.Errorf("the initramfs left files behind:\n%s", res.Console)
	}
}

// TestRunInitramfsOnly: Config.Initramfs boots through kiln-init's
// initramfs when no module needs loading, so that kiln-init mounts the
// root (the kernel would name it /dev/root).
func TestRunInitramfsOnly(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
echo "root: $(grep ' / ' /proc/mounts | grep -v rootfs | cut -d, -f1)"
`+vmboottest.PowerOff)
	cfg.Initramfs = true
	cfg.InitramfsInit = vmboottest.KilnInit(t)
	bootInitramfs(t, cfg, "root: /dev/nvme0n1 / ext4 ro\n")
}

// bootInitramfs boots cfg, which must power off cleanly with each of want
// on the console and no message from kiln-init in its initramfs.
func bootInitramfs(t *testing.T, cfg vmboot.Config, want ...string) vmboot.Result {
	t.Helper()
	res, err := vmboot.Run(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("booted and powered off in %s", res.Duration)
	if !res.Exited || res.Panicked {
		t.Errorf("Exited=%v Panicked=%v:\n%s", res.Exited, res.Panicked, res.Console)
	}
	for _, w := range want {
		if !strings.Contains(res.Console, w) {
			t.Errorf("console lacks %q:\n%s", w, res.Console)
		}
	}
	if strings.Contains(res.Console, "kiln-init:") {
		t.Errorf("kiln-init had something to say:\n%s", res.Console)
	}
	return res
}

// TestRunInitramfsVerity boots a verity root with a kernel that has
// device-mapper as modules and no CONFIG_DM_INIT: kiln-init, as the
// initramfs's /init, loads them, creates the device dm-mod.create=
// describes, links its name in /dev/mapper and mounts it as the root.
func TestRunInitramfsVerity(t *testing.T) {
	t.Parallel()
	cfg := newConfig(t, prologue+`
mount -t sysfs sys /sys
echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
echo "root: $(grep ' / ' /proc/mounts | grep -v rootfs | cut -d, -f1)"
echo "mapper: $(readlink /dev/mapper/vroot)"
echo "dm-0: $(cat /sys/block/dm-0/dm/name) ro=$(cat /sys/block/dm-0/ro)"
`+vmboottest.PowerOff)
	v, err := verity.Append(cfg.Rootfs, "test", false)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Modules = []string{"dm_mod", "dm_verity"}
	cfg.InitramfsInit = vmboottest.KilnInit(t)
	cfg.Append = []string{"dm-mod.create=vroot,,,ro," + v.Table("/dev/nvme0n1"), "root=/dev/mapper/vroot"}

	bootInitramfs(t, cfg,
		"dm_bufio dm_mod dm_verity ",
		"root: /dev/mapper/vroot / ext4 ro\n",
		"mapper: ../dm-0\n",
		"dm-0: vroot ro=1\n",
	)
}

// TestRunInitramfsBadDeviceMapper: a dm-mod.create= that is malformed,
// names a disk the machine lacks or holds a table the kernel refuses ends
// the boot with kiln-init's error and a power-off, not a panic or a hang.
func TestRunInitramfsBadDeviceMapper(t *testing.T) {
	t.Parallel()
	init := vmboottest.KilnInit(t)
	for _, tc := range []struct{ name, create, want string }{
		{"malformed", "vroot,,,rx,0 8 linear /dev/nvme0n1 0",
			`kiln-init: error: initramfs: dm-mod.create: device 1: "vroot": flags "rx", want ro or rw`},
		{"missing disk", "vroot,,,ro,0 8 linear /dev/vdz 0",
			"kiln-init: error: initramfs: dm-mod.create: device /dev/vdz did not appear within 10s"},
		{"refused table", "vroot,,,ro,0 8 verity 1 /dev/nvme0n1 /dev/nvme0n1 4096 4096 1 1 nohash 00 -",
			`kiln-init: error: initramfs: dm-mod.create: device "vroot": dm table load 'vroot': `},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := newConfig(t, prologue+"echo reached-the-root\n"+vmboottest.PowerOff)
			cfg.Modules = []string{"dm_mod", "dm_verity"}
			cfg.InitramfsInit = init
			cfg.Append = []string{"dm-mod.create=" + tc.create, "root=/dev/dm-0"}
			res, err := vmboot.Run(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Exited || res.Panicked || !strings.Contains(res.Console, tc.want) ||
				strings.Contains(res.Console, "reached-the-root") {
				t.Errorf("Exited=%v Panicked=%v, want the console to say %q:\n%s", res.Exited, res.Panicked, tc.want, res.Console)
			}
		})
	}
}
