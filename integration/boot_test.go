package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/dirtar"
	"github.com/kilnfs/kiln/internal/vmboot/vmboottest"
)

// Booting is the proof that kiln's output is bootable: these tests boot
// converted images under QEMU (TCG here; see internal/vmboot) through
// `kiln boot`. Set KILN_SKIP_BOOT=1 to leave them out on a slow machine.

func needBoot(t *testing.T) string {
	t.Helper()
	if os.Getenv("KILN_SKIP_BOOT") != "" {
		t.Skip("KILN_SKIP_BOOT is set")
	}
	vmboottest.RequireQEMU(t)
	return vmboottest.Kernel(t).Vmlinuz
}

var busyboxLayer struct {
	once sync.Once
	tar  []byte
	err  error
}

// busyboxImage is Debian's static busybox alone, with cfg as the config:
// an image without any init system.
func busyboxImage(t *testing.T, cfg v1.Config, extra ...testimage.Layer) v1.Image {
	t.Helper()
	busyboxLayer.once.Do(func() {
		dir, err := testimage.Busybox()
		if err != nil {
			busyboxLayer.err = err
			return
		}
		var buf bytes.Buffer
		busyboxLayer.err = dirtar.Write(&buf, dir, dirtar.Options{})
		busyboxLayer.tar = buf.Bytes()
	})
	if busyboxLayer.err != nil {
		vmboottest.Unavailable(t, "busybox fixture: %v", busyboxLayer.err)
	}
	layers := append([]testimage.Layer{{Tar: busyboxLayer.tar}}, extra...)
	return mustBuild(t, testimage.Image{Layers: layers, Config: cfg})
}

// boot runs kiln boot on an image and returns its exit status and what it
// printed.
func boot(t *testing.T, kernel, image string, args ...string) (status int, stdout, console string) {
	t.Helper()
	return bootWith(t, kernel, image, nil, args...)
}

// bootWith is boot with more kiln boot flags.
func bootWith(t *testing.T, kernel, image string, flags []string, args ...string) (status int, stdout, console string) {
	t.Helper()
	cmd := append([]string{"boot", image, "--kernel", kernel, "--cache-dir", t.TempDir(), "--timeout", "4m"}, flags...)
	res := kiln(t, run{args: append(append(cmd, "--"), args...)})
	status = 0
	if res.err != nil {
		status = -1
		if ee, ok := res.err.(interface{ ExitCode() int }); ok {
			status = ee.ExitCode()
		}
	}
	if strings.Contains(res.stderr, "Kernel panic") {
		t.Errorf("the guest kernel panicked:\n%s", tailLines(res.stderr, 30))
	}
	return status, res.stdout, res.stderr
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestBootInitBusybox(t *testing.T) {
	kernel := needBoot(t)
	img := busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/busybox", "sh", "-c"},
		Cmd:        []string{`echo kiln-boot-marker "$GREETING" from $(/bin/busybox pwd) as $(/bin/busybox id -u); exit 3`},
		Env:        []string{"PATH=/bin", "GREETING=hello"},
		WorkingDir: "/tmp",
	})
	ref := mustPush(t, "boot/busybox:v1", img)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	s := convert(t, ref, out, t.TempDir(), "--inject", "init")
	if s.Init != "/.kiln/init" {
		t.Errorf("--json init = %q, want /.kiln/init", s.Init)
	}
	fsck(t, out)
	before := fileSHA(t, out)

	status, _, console := boot(t, kernel, out)
	if status != 3 {
		t.Errorf("kiln boot exit status %d, want the workload's 3\n%s", status, tailLines(console, 30))
	}
	for _, want := range []string{
		"kiln-boot-marker hello from /tmp as 0",
		"kiln-init: workload exited with status 3",
		"reboot: Power down", // the VM powered itself off
	} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q:\n%s", want, tailLines(console, 30))
		}
	}
	if fileSHA(t, out) != before {
		t.Errorf("booting read-only changed the image")
	}

	t.Run("args replace Cmd", func(t *testing.T) {
		status, _, console := boot(t, kernel, out, "echo overridden-cmd; exit 0")
		if status != 0 || !strings.Contains(console, "overridden-cmd") {
			t.Errorf("status %d, console:\n%s", status, tailLines(console, 20))
		}
	})
}

// newScratch makes an empty scratch disk as kiln serve would.
func newScratch(t *testing.T) string {
	t.Helper()
	scratch := filepath.Join(t.TempDir(), "scratch.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-L", "kiln-scratch", scratch, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return scratch
}

// scratchFile reads a file of the scratch disk with debugfs, which reads
// what is on the disk without replaying its journal. With clean, the disk
// must have been unmounted cleanly, as kiln-init does; systemd cannot reach
// it to unmount, but syncs it.
func scratchFile(t *testing.T, scratch, path string, clean bool) string {
	t.Helper()
	fsck(t, scratch)
	sb, err := exec.Command("dumpe2fs", "-h", scratch).Output()
	if err != nil {
		t.Fatalf("dumpe2fs: %v", err)
	}
	if clean && strings.Contains(string(sb), "needs_recovery") {
		t.Errorf("the scratch disk's journal needs recovery: it was not unmounted cleanly")
	}
	out, err := exec.Command("debugfs", "-R", "cat "+path, scratch).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", path, err)
	}
	return string(out)
}

const overlayLine = "kiln-init: root is an overlay of /dev/nvme0n1 (read-only) and /dev/nvme1n1 (scratch)"

// TestBootOverlayScratch boots a read-only image twice with the same scratch
// disk: kiln-init composes an overlay root, what the workload writes lands on
// the scratch disk and is there on the next boot, and the image never
// changes.
func TestBootOverlayScratch(t *testing.T) {
	kernel := needBoot(t)
	img := busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/busybox", "sh", "-c"},
		Cmd: []string{`busybox mkdir -p /data
if busybox test -f /data/marker; then echo "found $(busybox wc -l < /data/marker) lines"; else echo "no marker"; fi
echo written-by-kiln >> /data/marker
busybox awk '$2 == "/" { print "root-fstype=" $3 }' /proc/mounts`},
		Env: []string{"PATH=/bin"},
	})
	ref := mustPush(t, "boot/overlay:v1", img)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	convert(t, ref, out, t.TempDir(), "--inject", "init")
	before := fileSHA(t, out)
	scratch := newScratch(t)

	for i, want := range []string{"no marker", "found 1 lines"} {
		start := time.Now()
		status, _, console := bootWith(t, kernel, out, []string{"--scratch", scratch})
		t.Logf("boot %d took %v", i+1, time.Since(start).Round(time.Millisecond))
		if status != 0 {
			t.Fatalf("boot %d: status %d\n%s", i+1, status, tailLines(console, 30))
		}
		for _, line := range []string{overlayLine, want, "root-fstype=overlay", "kiln-init: workload exited with status 0"} {
			if !strings.Contains(console, line) {
				t.Errorf("boot %d: console lacks %q:\n%s", i+1, line, tailLines(console, 30))
			}
		}
	}
	if fileSHA(t, out) != before {
		t.Errorf("booting with a scratch disk changed the image")
	}
	if got := scratchFile(t, scratch, "/upper/data/marker", true); got != "written-by-kiln\nwritten-by-kiln\n" {
		t.Errorf("scratch disk has upper/data/marker %q, want two lines", got)
	}

	t.Run("bad kiln.overlay", func(t *testing.T) {
		status, _, console := bootWith(t, kernel, out, []string{"--scratch", scratch, "--append", "kiln.overlay=vdb"})
		if status != 1 || !strings.Contains(console, "kiln-init: error: overlay root: kiln.overlay=") ||
			!strings.Contains(console, "reboot: Power down") {
			t.Errorf("status %d, want 1 after a kiln-init error and a power-off:\n%s", status, tailLines(console, 20))
		}
	})
}

func TestBootInitBadConfig(t *testing.T) {
	kernel := needBoot(t)
	notExec := layerTar(t, tFile("bin/not-executable", 0o644, epoch2020, "#!/bin/sh\necho never\n"))
	cases := []struct {
		name   string
		cfg    v1.Config
		extra  []testimage.Layer
		status *regexp.Regexp
		msg    string
	}{
		{"no Entrypoint or Cmd", v1.Config{Env: []string{"PATH=/bin"}}, nil, regexp.MustCompile(`status [1-9]`), "Entrypoint"},
		{"missing user", v1.Config{Cmd: []string{"/bin/busybox", "true"}, User: "nobody-here"}, nil, regexp.MustCompile(`status [1-9]`), "nobody-here"},
		{"not executable", v1.Config{Cmd: []string{"/bin/not-executable"}}, []testimage.Layer{{Tar: notExec}}, regexp.MustCompile(`status 126`), "not-executable"},
		{"not found", v1.Config{Cmd: []string{"/bin/nope"}}, nil, regexp.MustCompile(`status 127`), "/bin/nope"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ref := mustPush(t, "boot/bad:"+strings.ReplaceAll(c.name, " ", "-"), busyboxImage(t, c.cfg, c.extra...))
			out := filepath.Join(t.TempDir(), "rootfs.ext4")
			convert(t, ref, out, t.TempDir(), "--inject", "init")
			status, _, console := boot(t, kernel, out)
			if status == 0 {
				t.Errorf("exit status 0 for a workload that cannot run")
			}
			if !strings.Contains(console, "kiln-init: error:") || !strings.Contains(console, c.msg) {
				t.Errorf("console lacks a kiln-init error naming %q:\n%s", c.msg, tailLines(console, 20))
			}
			if !c.status.MatchString(console) || !strings.Contains(console, "reboot: Power down") {
				t.Errorf("console lacks the status line %s or the power-off:\n%s", c.status, tailLines(console, 20))
			}
		})
	}
}

func TestBootSystemdAgent(t *testing.T) {
	kernel := needBoot(t)
	needRoot(t, "the systemd image is made with debootstrap")
	tarFile, err := testimage.MinbaseTar("systemd-sysv", "udev")
	if err != nil {
		t.Fatalf("systemd minbase fixture: %v", err)
	}
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{File: tarFile}}, Config: v1.Config{Cmd: []string{"/bin/bash"}}})
	ref := mustPush(t, "boot/systemd:v1", img)
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	convert(t, ref, out, t.TempDir(), "--inject", "agent,network")
	fsck(t, out)
	bootSystemdAgent(t, kernel, out)

	// kiln-init composes the overlay root, then starts systemd.
	t.Run("overlay root", func(t *testing.T) {
		before := fileSHA(t, out)
		scratch := newScratch(t)
		start := time.Now()
		status, stdout, console := bootWith(t, kernel, out, []string{"--scratch", scratch}, "sh", "-c",
			"systemctl is-system-running --wait >/dev/null; systemctl is-active multi-user.target; "+
				"findmnt -no FSTYPE /; echo from-systemd > /etc/kiln-overlay")
		t.Logf("booted in %v", time.Since(start).Round(time.Millisecond))
		if status != 0 {
			t.Fatalf("kiln boot: status %d\n%s", status, tailLines(console, 40))
		}
		if stdout != "active\noverlay\n" {
			t.Errorf("multi-user.target and the root's type: %q, want active and overlay", stdout)
		}
		for _, line := range []string{overlayLine, "kiln-init: starting the image's init /sbin/init"} {
			if !strings.Contains(console, line) {
				t.Errorf("console lacks %q:\n%s", line, tailLines(console, 40))
			}
		}
		if fileSHA(t, out) != before {
			t.Errorf("booting with a scratch disk changed the image")
		}
		if got := scratchFile(t, scratch, "/upper/etc/kiln-overlay", false); got != "from-systemd\n" {
			t.Errorf("scratch disk has upper/etc/kiln-overlay %q", got)
		}
	})
}

// bootSystemdAgent boots a systemd image with kiln-agent to multi-user and
// runs `cat /etc/os-release` through the agent on the second serial port.
func bootSystemdAgent(t *testing.T, kernel, image string) {
	t.Helper()
	status, stdout, console := boot(t, kernel, image, "sh", "-c",
		"systemctl is-system-running --wait >/dev/null; systemctl is-active multi-user.target; cat /etc/os-release")
	if status != 0 {
		t.Fatalf("kiln boot: status %d\n%s", status, tailLines(console, 40))
	}
	if !strings.HasPrefix(stdout, "active\n") {
		t.Errorf("multi-user.target is not active: %q", firstLine(stdout))
	}
	if !strings.Contains(stdout, `PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"`) {
		t.Errorf("no os-release through the agent:\n%s", stdout)
	}
	if !strings.Contains(console, "kiln boot: kiln-agent") {
		t.Errorf("not booted in agent mode:\n%s", tailLines(console, 10))
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func TestInjectNoRoom(t *testing.T) {
	img := busyboxImage(t, v1.Config{Cmd: []string{"/bin/busybox", "true"}})
	ref := mustPush(t, "boot/noroom:v1", img)
	dir := t.TempDir()
	convert(t, ref, filepath.Join(dir, "fits.ext4"), t.TempDir(), "--size", "4M")
	msg := convertFails(t, ref, filepath.Join(dir, "full.ext4"), t.TempDir(), "--size", "4M", "--inject", "init")
	if !strings.Contains(msg, "does not fit") {
		t.Errorf("error does not say the rootfs does not fit: %s", msg)
	}
}

func TestInjectClash(t *testing.T) {
	clash := layerTar(t, tDir(".kiln/", 0o755, epoch2020), tFile(".kiln/init", 0o755, epoch2020, "#!/bin/sh\n"))
	img := busyboxImage(t, v1.Config{Cmd: []string{"/bin/busybox", "true"}}, testimage.Layer{Tar: clash})
	ref := mustPush(t, "boot/clash:v1", img)
	dir := t.TempDir()
	msg := convertFails(t, ref, filepath.Join(dir, "a.ext4"), t.TempDir(), "--inject", "init")
	if !strings.Contains(msg, "/.kiln/init") || !strings.Contains(msg, "--force") {
		t.Errorf("clash error does not name the file and --force: %s", msg)
	}
	convert(t, ref, filepath.Join(dir, "b.ext4"), t.TempDir(), "--inject", "init", "--force")
}

// epoch2020 dates the hand-written files of these tests.
var epoch2020 = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)

// TestBootServeExport pulls an image without an init system through
// containerd with kiln serve configured to inject init, exports it, and
// boots it: the same rootfs as kiln convert --inject init, byte for byte.
func TestBootServeExport(t *testing.T) {
	kernel := needBoot(t)
	e := startContainerd(t, testcontainerd.Options{Inject: []string{"init"}})
	img := busyboxImage(t, v1.Config{
		Cmd: []string{"/bin/busybox", "sh", "-c", "echo served-and-booted; exit 5"},
		Env: []string{"PATH=/bin"},
	})
	ref := mustPush(t, "boot/served:v1", img)
	if out, err := ctrRun(t, e, ctdPullArgs("default", ref, false)...); err != nil {
		t.Fatalf("ctr image pull: %v\n%s", err, out)
	}
	dir := t.TempDir()
	exported := filepath.Join(dir, "exported.ext4")
	ctdExport(t, e, "default", ref, exported)
	fsck(t, exported)
	converted := filepath.Join(dir, "converted.ext4")
	convert(t, ref, converted, t.TempDir(), "--inject", "init")
	if fileSHA(t, exported) != fileSHA(t, converted) {
		t.Errorf("the export differs from kiln convert --inject init")
	}
	status, _, console := boot(t, kernel, exported)
	if status != 5 || !strings.Contains(console, "served-and-booted") {
		t.Errorf("status %d, console:\n%s", status, tailLines(console, 20))
	}
}

// TestInjectDir adds a platform's own bundle with --inject-dir: entries
// land with the owners and modes the manifest gives.
func TestInjectDir(t *testing.T) {
	bundle := t.TempDir()
	manifest := `
[[entry]]
path = "/opt/agent/agent"
source = "agent"
mode = "0750"
uid = 1000
gid = 2000

[[entry]]
path = "/etc/agent.conf"
source = "agent.conf"
mode = "0600"

[[entry]]
path = "/usr/local/bin/agent"
type = "symlink"
target = "/opt/agent/agent"
`
	for name, body := range map[string]string{"manifest.toml": manifest, "agent": "#!/bin/sh\necho agent\n", "agent.conf": "port=1024\n"} {
		if err := os.WriteFile(filepath.Join(bundle, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ref := mustPush(t, "boot/bundle:v1", busyboxImage(t, v1.Config{Cmd: []string{"/bin/busybox", "true"}}))
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	convert(t, ref, out, t.TempDir(), "--inject-dir", bundle)
	fsck(t, out)
	fs := inspect(t, out)
	for path, want := range map[string]struct {
		mode     uint32
		uid, gid uint32
		target   string
	}{
		"/opt/agent/agent":     {0o750, 1000, 2000, ""},
		"/etc/agent.conf":      {0o600, 0, 0, ""},
		"/usr/local/bin/agent": {0o777, 0, 0, "/opt/agent/agent"},
	} {
		e := fs.Entries[path]
		if e == nil {
			t.Errorf("%s is missing", path)
			continue
		}
		if e.Mode != want.mode || e.UID != want.uid || e.GID != want.gid || e.Target != want.target {
			t.Errorf("%s: mode %o owner %d:%d target %q, want %o %d:%d %q", path, e.Mode, e.UID, e.GID, e.Target, want.mode, want.uid, want.gid, want.target)
		}
	}
}
