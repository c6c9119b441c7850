package vmboot

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestCommand(t *testing.T) {
	args, err := Command(Config{
		Kernel:      "/k/vmlinuz",
		Rootfs:      "/images/a,b.ext4",
		ReadOnly:    true,
		Init:        "/sbin/init",
		Append:      []string{"loglevel=4", "x=two words"},
		InitArgs:    []string{"run", "hello world"},
		ConsoleLog:  "/logs/console.log",
		AgentSocket: "/run/agent.sock",
	})
	if err != nil {
		t.Fatal(err)
	}

	// The kernel command line depends on the host's TSC; check it apart.
	i := slices.Index(args, "-append")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("no -append in %q", args)
	}
	cmdline := args[i+1]
	args[i+1] = "CMDLINE"

	want := []string{
		"qemu-system-x86_64", "-nodefaults", "-no-user-config",
		"-accel", "tcg",
		"-machine", "microvm,pcie=on,rtc=on",
		"-m", "512", "-smp", "1",
		"-display", "none", "-no-reboot",
		"-kernel", "/k/vmlinuz",
		"-chardev", "file,id=console,path=/logs/console.log",
		"-serial", "chardev:console",
		"-chardev", "socket,id=agent,path=/run/agent.sock,server=on,wait=on",
		"-device", "isa-serial,chardev=agent,index=1",
		"-drive", "file=/images/a,,b.ext4,if=none,id=rootfs,format=raw,readonly=on",
		"-device", "nvme,drive=rootfs,serial=rootfs",
		"-append", "CMDLINE",
	}
	if !slices.Equal(args, want) {
		t.Errorf("Command:\n got %q\nwant %q", args, want)
	}

	wantCmdline := regexp.MustCompile(`^console=ttyS0 root=/dev/nvme0n1 rootfstype=ext4 ro panic=-1 ` +
		`(tsc_early_khz=\d+ tsc=reliable )?` +
		`init=/sbin/init loglevel=4 x="two words" -- run "hello world"$`)
	if !wantCmdline.MatchString(cmdline) {
		t.Errorf("kernel command line %q does not match %s", cmdline, wantCmdline)
	}
}

func TestCommandReadWriteKVM(t *testing.T) {
	args, err := Command(Config{
		Kernel: "k", Rootfs: "r", ConsoleLog: "c",
		Accel: AccelKVM, MemoryMiB: 1024, CPUs: 2, QEMU: "/opt/qemu",
	})
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(args, " ")
	for _, want := range []string{
		"/opt/qemu ", "-accel kvm -cpu host ", "-m 1024 -smp 2 ",
		"-drive file=r,if=none,id=rootfs,format=raw -device",
		"rootfstype=ext4 rw panic=-1",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("command %q lacks %q", got, want)
		}
	}
	for _, unwanted := range []string{"readonly", "tsc_early_khz", "isa-serial", "init="} {
		if strings.Contains(got, unwanted) {
			t.Errorf("command %q has %q", got, unwanted)
		}
	}
}

func TestCommandDisks(t *testing.T) {
	cfg := Config{
		Kernel: "k", Rootfs: "r", ConsoleLog: "c", ReadOnly: true,
		Disks: []Disk{{Path: "/d/scratch.ext4"}, {Path: "/d/a,b", ReadOnly: true}},
	}
	args, err := command(cfg, "/tmp/initramfs.cpio")
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(args, " ")
	for _, want := range []string{
		"-kernel k -initrd /tmp/initramfs.cpio ",
		"-device nvme,drive=rootfs,serial=rootfs " +
			"-drive file=/d/scratch.ext4,if=none,id=disk1,format=raw -device nvme,drive=disk1,serial=disk1 " +
			"-drive file=/d/a,,b,if=none,id=disk2,format=raw,readonly=on -device nvme,drive=disk2,serial=disk2 -append ",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("command %q lacks %q", got, want)
		}
	}
	if d := DiskDevice(1); d != "/dev/nvme2n1" {
		t.Errorf("DiskDevice(1) = %s", d)
	}
	if args, _ := Command(cfg); slices.Contains(args, "-initrd") {
		t.Errorf("Command has -initrd: %q", args)
	}
}

func TestStartModulesNeedKernelPackage(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "bzImage")
	rootfs := filepath.Join(dir, "rootfs.ext4")
	for _, f := range []string{kernel, rootfs} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, err := Start(t.Context(), Config{
		Kernel: kernel, Rootfs: rootfs, Modules: []string{"overlay"},
		ConsoleLog: filepath.Join(dir, "console.log"),
		QEMU:       "true",
	})
	if err == nil || !strings.Contains(err.Error(), "vmlinuz-RELEASE") {
		t.Fatalf("Start error = %v, want one saying the kernel's modules cannot be found", err)
	}
}

func TestCommandInvalid(t *testing.T) {
	valid := Config{Kernel: "k", Rootfs: "r", ConsoleLog: "c"}
	for name, change := range map[string]func(*Config){
		"no kernel":       func(c *Config) { c.Kernel = "" },
		"no rootfs":       func(c *Config) { c.Rootfs = "" },
		"no console":      func(c *Config) { c.ConsoleLog = "" },
		"bad accel":       func(c *Config) { c.Accel = "hvf" },
		"relative init":   func(c *Config) { c.Init = "init" },
		"quote in param":  func(c *Config) { c.Append = []string{`a="b"`} },
		"empty init arg":  func(c *Config) { c.InitArgs = []string{""} },
		"newline in arg":  func(c *Config) { c.InitArgs = []string{"a\nb"} },
		"too many args":   func(c *Config) { c.InitArgs = make([]string, 31) },
		"long socket":     func(c *Config) { c.AgentSocket = "/" + strings.Repeat("s", 110) },
		"huge cmdline":    func(c *Config) { c.Append = []string{strings.Repeat("x", 2100)} },
		"negative memory": func(c *Config) { c.MemoryMiB = -1 },
		"disk no path":    func(c *Config) { c.Disks = []Disk{{ReadOnly: true}} },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := valid
			change(&cfg)
			if _, err := Command(cfg); err == nil {
				t.Error("Command accepted an invalid config")
			}
		})
	}
}

func TestShellQuote(t *testing.T) {
	got := shellQuote([]string{"qemu", "-append", "console=ttyS0 ro", "it's", "", "a,b=c:d/e"})
	want := `qemu -append 'console=ttyS0 ro' 'it'\''s' '' a,b=c:d/e`
	if got != want {
		t.Errorf("shellQuote = %s, want %s", got, want)
	}
}

func TestStartWithoutQEMU(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	rootfs := filepath.Join(dir, "rootfs.ext4")
	for _, f := range []string{kernel, rootfs} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, err := Start(t.Context(), Config{
		Kernel: kernel, Rootfs: rootfs,
		ConsoleLog: filepath.Join(dir, "console.log"),
		QEMU:       "qemu-system-x86_64-not-installed",
	})
	if !errors.Is(err, ErrQEMUNotFound) {
		t.Fatalf("Start error = %v, want ErrQEMUNotFound", err)
	}
	if !strings.Contains(err.Error(), "apt-get install") {
		t.Errorf("error %q does not say how to install QEMU", err)
	}
}

func TestStartMissingRootfs(t *testing.T) {
	dir := t.TempDir()
	_, err := Start(t.Context(), Config{
		Kernel:     filepath.Join(dir, "vmlinuz"),
		Rootfs:     filepath.Join(dir, "rootfs.ext4"),
		ConsoleLog: filepath.Join(dir, "console.log"),
	})
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Start error = %v, want a not-exist error", err)
	}
}
