package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/power"
	"github.com/kilnfs/kiln/internal/guest/pty"
	"github.com/kilnfs/kiln/internal/testenv"
)

// These tests boot kiln-init as PID 1 of fresh PID, mount, UTS, IPC and
// network namespaces, chrooted into a small root filesystem, with a
// pseudo-terminal as its console. In a PID namespace reboot(2) ends the
// namespace instead of the machine, so the power-off path runs for real:
// the namespace's init is then reported killed by SIGINT (power off) or
// SIGHUP (restart).

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds kiln-init and the test workload once per test run.
func binaries(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "booting kiln-init in namespaces needs root")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: the go tool is needed to build kiln-init")
	}
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "kiln-init-test-")
		if buildErr != nil {
			return
		}
		for pkg, out := range map[string]string{".": "kiln-init", "./testdata/workload": "workload"} {
			cmd := exec.Command(goTool, "build", "-o", filepath.Join(binDir, out), pkg)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if output, err := cmd.CombinedOutput(); err != nil {
				buildErr = errors.New(string(output))
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatalf("build: %v", buildErr)
	}
	return binDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

type rootfs struct {
	t    *testing.T
	dir  string
	bins string
}

// newRootfs lays out an image root: kiln-init, the workload as
// /bin/workload, accounts, an /etc/hostname and the image config. Mount
// points are left for kiln-init to create.
func newRootfs(t *testing.T, imageConfig string) *rootfs {
	bins := binaries(t)
	r := &rootfs{t: t, dir: t.TempDir(), bins: bins}
	// The workload runs as an unprivileged user, who must be able to
	// look up paths from the root.
	if err := os.Chmod(r.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r.copy(filepath.Join(bins, "kiln-init"), guest.InitPath, 0o755)
	r.copy(filepath.Join(bins, "workload"), "/bin/workload", 0o755)
	r.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n", 0o644)
	r.write("/etc/group", "root:x:0:\napp:x:1000:\nwheel:x:10:app\n", 0o644)
	r.write("/etc/hostname", "e2e-host\n", 0o644)
	r.write("/bin/not-executable", "data", 0o644)
	r.write(guest.ImageConfigPath, imageConfig, 0o644)
	return r
}

func (r *rootfs) write(name, content string, mode os.FileMode) {
	r.t.Helper()
	p := filepath.Join(r.dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		r.t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rootfs) copy(src, name string, mode os.FileMode) {
	r.t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		r.t.Fatal(err)
	}
	r.write(name, string(data), mode)
}

type boot struct {
	output string
	status syscall.WaitStatus
}

// lines returns the console output without carriage returns.
func (b boot) lines() []string {
	return strings.Split(strings.ReplaceAll(b.output, "\r", ""), "\n")
}

// value returns the value of the first "key=value" line.
func (b boot) value(key string) string {
	for _, l := range b.lines() {
		if v, ok := strings.CutPrefix(l, key+"="); ok {
			return v
		}
	}
	return ""
}

// boot runs kiln-init with args as PID 1 in the root filesystem. While it
// runs, interact may signal it (its host pid is passed).
func (r *rootfs) boot(args []string, interact func(pid int, console *consoleReader)) boot {
	r.t.Helper()
	controller, terminal, err := pty.Open()
	if err != nil {
		r.t.Fatal(err)
	}
	defer controller.Close()

	cmd := &exec.Cmd{
		Path:   guest.InitPath,
		Args:   append([]string{guest.InitPath}, args...),
		Env:    []string{"HOME=/", "TERM=linux"},
		Stdin:  terminal,
		Stdout: terminal,
		Stderr: terminal,
		SysProcAttr: &syscall.SysProcAttr{
			Chroot: r.dir,
			Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC |
				syscall.CLONE_NEWNET,
			// Go makes the new mount namespace private to the child.
			Unshareflags: syscall.CLONE_NEWNS,
		},
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("start kiln-init: %v", err)
	}
	terminal.Close()
	console := newConsoleReader(controller)

	done := make(chan struct{})
	timer := time.AfterFunc(60*time.Second, func() {
		r.t.Error("kiln-init did not stop the machine within 60s")
		cmd.Process.Kill()
	})
	defer timer.Stop()
	if interact != nil {
		go func() {
			defer close(done)
			interact(cmd.Process.Pid, console)
		}()
	} else {
		close(done)
	}
	cmd.Wait()
	<-done
	out := console.wait()
	b := boot{output: out, status: cmd.ProcessState.Sys().(syscall.WaitStatus)}
	r.t.Logf("console:\n%s", strings.ReplaceAll(out, "\r", ""))
	return b
}

// consoleReader collects the console output.
type consoleReader struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	done chan struct{}
}

func newConsoleReader(f *os.File) *consoleReader {
	c := &consoleReader{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		p := make([]byte, 4096)
		for {
			f.SetReadDeadline(time.Now().Add(70 * time.Second))
			n, err := f.Read(p)
			c.mu.Lock()
			c.buf.Write(p[:n])
			c.mu.Unlock()
			if err != nil {
				return // EIO once every holder of the terminal is gone
			}
		}
	}()
	return c
}

// waitFor waits until the output contains s.
func (c *consoleReader) waitFor(s string) bool {
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		c.mu.Lock()
		found := strings.Contains(c.buf.String(), s)
		c.mu.Unlock()
		if found {
			return true
		}
	}
	return false
}

func (c *consoleReader) wait() string {
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func imageConfig(t *testing.T, cfg map[string]any) string {
	data, err := json.Marshal(map[string]any{"architecture": "amd64", "os": "linux", "config": cfg})
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func wantPowerOff(t *testing.T, b boot) {
	t.Helper()
	if !b.status.Signaled() || b.status.Signal() != syscall.SIGINT {
		t.Errorf("kiln-init ended with %v; want the PID namespace ended by a power-off (SIGINT)", b.status)
	}
}

func wantLine(t *testing.T, b boot, line string) {
	t.Helper()
	n := 0
	for _, l := range b.lines() {
		if l == line {
			n++
		}
	}
	if n != 1 {
		t.Errorf("console has %d lines %q, want exactly one", n, line)
	}
}

func TestBootRunsWorkload(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{
		"Entrypoint": []string{"workload"},
		"Cmd":        []string{"report", "default-arg"},
		"Env":        []string{"EXIT_CODE=7", "GREETING=hello world", "EXPECT_AGENT=1"},
		"User":       "app",
		"WorkingDir": "/srv/app",
	}))
	r.copy(filepath.Join(r.bins, "workload"), guest.AgentPath, 0o755)

	b := r.boot(nil, nil)
	wantLine(t, b, "kiln-init: workload exited with status 7")
	wantPowerOff(t, b)

	checks := map[string]string{
		"args":          `["report","default-arg"]`,
		"uid=1000 gid":  "1000",
		"groups":        "[10]",
		"cwd":           "/srv/app",
		"hostname":      "e2e-host",
		"setsid":        "true",
		"foreground":    "true",
		"lo-up":         "true",
		"agent-started": "true",
		"mounts": "/proc:proc,/sys:sysfs,/dev:devtmpfs,/dev/pts:devpts,/dev/shm:tmpfs," +
			"/run:tmpfs,/tmp:tmpfs",
	}
	for key, want := range checks {
		if got := b.value(key); got != want {
			t.Errorf("%s = %q, want %q", key, got, want)
		}
	}
	var env []string
	if err := json.Unmarshal([]byte(b.value("env")), &env); err != nil {
		t.Fatalf("env: %v", err)
	}
	wantEnv := []string{"EXIT_CODE=7", "EXPECT_AGENT=1", "GREETING=hello world", "HOME=/home/app",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=linux"}
	if strings.Join(env, "\n") != strings.Join(wantEnv, "\n") {
		t.Errorf("env = %q, want %q", env, wantEnv)
	}
	if pid := b.value("pid"); pid == "1" || pid == "" {
		t.Errorf("workload pid = %q; it should be a child of PID 1", pid)
	}
}

func TestBootArgumentsReplaceCmd(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{
		"Entrypoint": []string{"/bin/workload"},
		"Cmd":        []string{"kill-self"},
	}))
	b := r.boot([]string{"report", "from-kernel"}, nil)
	if got := b.value("args"); got != `["report","from-kernel"]` {
		t.Errorf("args = %s", got)
	}
	if got := b.value("uid=0 gid"); got != "0" {
		t.Errorf("default user: uid=0 gid=%s", got)
	}
	if got := b.value("agent-started"); got != "false" {
		t.Errorf("agent-started = %s without /.kiln/agent", got)
	}
	wantLine(t, b, "kiln-init: workload exited with status 0")
	wantPowerOff(t, b)
}

func TestBootReportsSignalDeath(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{"Cmd": []string{"workload", "kill-self"}}))
	b := r.boot(nil, nil)
	wantLine(t, b, "kiln-init: workload killed by signal SIGKILL")
	wantPowerOff(t, b)
}

func TestBootReapsOrphans(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{"Cmd": []string{"workload", "orphans"}}))
	b := r.boot(nil, nil)
	if got := b.value("orphan-ppid"); got != "1" {
		t.Errorf("orphan's parent = %q, want 1 (kiln-init)", got)
	}
	if got := b.value("zombies"); got != "0" {
		t.Errorf("zombies = %q after the orphan exited, want 0", got)
	}
	wantLine(t, b, "kiln-init: workload exited with status 0")
}

func TestBootForwardsSignals(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{"Cmd": []string{"workload", "wait-signal"}}))
	b := r.boot(nil, func(pid int, console *consoleReader) {
		if !console.waitFor("ready") {
			t.Error("workload never became ready")
			return
		}
		syscall.Kill(pid, syscall.SIGTERM)
	})
	if got := b.value("got"); got != "SIGTERM" {
		t.Errorf("workload got %q, want SIGTERM forwarded by kiln-init", got)
	}
	wantLine(t, b, "kiln-init: workload exited with status 42")
	wantPowerOff(t, b)
}

func TestBootRebootRequest(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{"Cmd": []string{"workload", "wait-signal"}}))
	b := r.boot(nil, func(pid int, console *consoleReader) {
		if !console.waitFor("ready") {
			t.Error("workload never became ready")
			return
		}
		// What the agent sends to ask for an orderly reboot.
		syscall.Kill(pid, power.SignalReboot)
	})
	if got := b.value("got"); got != "SIGTERM" {
		t.Errorf("workload got %q, want SIGTERM on a reboot request", got)
	}
	wantLine(t, b, "kiln-init: workload exited with status 42")
	if !b.status.Signaled() || b.status.Signal() != syscall.SIGHUP {
		t.Errorf("kiln-init ended with %v; want the PID namespace ended by a restart (SIGHUP)", b.status)
	}
}

func TestBootFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		config string
		status int
		error  string
	}{
		{"no command", `{"config":{}}`, 1, "no Entrypoint or Cmd"},
		{"missing executable", `{"config":{"Cmd":["nope"]}}`, 127, `executable "nope" not found in PATH`},
		{"not executable", `{"config":{"Cmd":["/bin/not-executable"]}}`, 126, "is not executable"},
		{"unknown user", `{"config":{"Cmd":["workload"],"User":"ghost"}}`, 1, `image user "ghost"`},
		{"unreadable config", `{"config":`, 1, "parse image config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRootfs(t, tc.config)
			b := r.boot(nil, nil)
			found := false
			for _, l := range b.lines() {
				if strings.HasPrefix(l, "kiln-init: error: ") && strings.Contains(l, tc.error) {
					found = true
				}
			}
			if !found {
				t.Errorf("no \"kiln-init: error:\" line mentioning %q", tc.error)
			}
			wantLine(t, b, "kiln-init: workload exited with status "+strconv.Itoa(tc.status))
			wantPowerOff(t, b)
		})
	}
}

func TestBootReadOnlyRoot(t *testing.T) {
	r := newRootfs(t, imageConfig(t, map[string]any{"Cmd": []string{"workload", "report"}}))
	// Only /proc, /dev and /tmp exist; the root is then made read-only.
	for _, d := range []string{"proc", "dev", "tmp"} {
		if err := os.Mkdir(filepath.Join(r.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount(r.dir, r.dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(r.dir, syscall.MNT_DETACH)
	if err := syscall.Mount("", r.dir, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}

	b := r.boot(nil, nil)
	if !strings.Contains(b.output, "kiln-init: warning: cannot create mount point /sys on the read-only root") {
		t.Error("no warning about the missing /sys mount point")
	}
	if got := b.value("mounts"); !strings.HasPrefix(got, "/proc:proc,/sys:,/dev:devtmpfs,/dev/pts:devpts") ||
		!strings.HasSuffix(got, "/tmp:tmpfs") {
		t.Errorf("mounts = %s", got)
	}
	wantLine(t, b, "kiln-init: workload exited with status 0")
	wantPowerOff(t, b)
}

func TestNetworkOnlyUsage(t *testing.T) {
	bins := binaries(t)
	cmd := exec.Command(filepath.Join(bins, "kiln-init"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(stderr.String(), "--network-only") {
		t.Errorf("kiln-init outside PID 1 without flags: %v, %q; want usage and status 2", err, stderr.String())
	}
}

// TestNetworkOnly runs "kiln-init --network-only" as kiln-network.service
// would, in fresh namespaces and chrooted into a root whose /proc is a plain
// directory holding the kernel command line to apply.
func TestNetworkOnly(t *testing.T) {
	for _, tc := range []struct {
		name, cmdline string
		wantStatus    int
		wantResolv    string
		wantStderr    string
	}{
		{
			name:       "static",
			cmdline:    "console=ttyS0 ip=10.42.0.2::10.42.0.1:255.255.255.0:vm:lo:off:10.42.0.53 kiln.dns=10.42.0.54,10.42.0.55",
			wantResolv: "nameserver 10.42.0.54\nnameserver 10.42.0.55\n",
		},
		{
			name:       "bad ip",
			cmdline:    "ip=10.42.0.999",
			wantStatus: 1,
			wantStderr: `kiln-init: error: network: ip=10.42.0.999: client-ip "10.42.0.999" is not an IPv4 address`,
		},
		{
			name:       "missing device",
			cmdline:    "ip=10.42.0.2::10.42.0.1:255.255.255.0::eth9:off",
			wantStatus: 1,
			wantStderr: "network interface eth9 from ip=",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRootfs(t, "{}")
			r.write("/proc/cmdline", tc.cmdline+"\n", 0o444)
			var stderr bytes.Buffer
			cmd := &exec.Cmd{
				Path:   guest.InitPath,
				Args:   []string{guest.InitPath, "--network-only"},
				Stderr: &stderr,
				SysProcAttr: &syscall.SysProcAttr{
					Chroot:       r.dir,
					Cloneflags:   syscall.CLONE_NEWUTS | syscall.CLONE_NEWNET,
					Unshareflags: syscall.CLONE_NEWNS,
				},
			}
			err := cmd.Run()
			status := 0
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				status = exit.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if status != tc.wantStatus {
				t.Errorf("status %d, want %d; stderr:\n%s", status, tc.wantStatus, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Errorf("stderr %q does not contain %q", stderr.String(), tc.wantStderr)
			}
			resolv, _ := os.ReadFile(filepath.Join(r.dir, "etc/resolv.conf"))
			if !strings.Contains(string(resolv), tc.wantResolv) || (tc.wantResolv == "" && len(resolv) > 0) {
				t.Errorf("resolv.conf = %q, want %q", resolv, tc.wantResolv)
			}
		})
	}
}

// TestBootExecsImageInit boots an image that has an init of its own and no
// kiln image config: kiln-init hands PID 1 over to it with its arguments.
func TestBootExecsImageInit(t *testing.T) {
	r := newRootfs(t, "")
	if err := os.Remove(filepath.Join(r.dir, guest.ImageConfigPath)); err != nil {
		t.Fatal(err)
	}
	r.copy(filepath.Join(r.bins, "workload"), "/sbin/init", 0o755)
	b := r.boot([]string{"report", "from-kernel"}, nil)
	wantLine(t, b, "kiln-init: starting the image's init /sbin/init")
	if got := b.value("pid"); got != "1" {
		t.Errorf("the image's init runs as pid %q, want 1", got)
	}
	if got := b.value("args"); got != `["report","from-kernel"]` {
		t.Errorf("args = %s", got)
	}
	// The image's init, not kiln-init, ended the namespace.
	if !b.status.Exited() || b.status.ExitStatus() != 0 {
		t.Errorf("PID 1 ended with %v, want the image's init to exit 0", b.status)
	}
}

func TestBootWithoutConfigOrInit(t *testing.T) {
	r := newRootfs(t, "")
	if err := os.Remove(filepath.Join(r.dir, guest.ImageConfigPath)); err != nil {
		t.Fatal(err)
	}
	b := r.boot(nil, nil)
	found := false
	for _, l := range b.lines() {
		if strings.HasPrefix(l, "kiln-init: error: ") && strings.Contains(l, "nor an init of its own") {
			found = true
		}
	}
	if !found {
		t.Error("no kiln-init error saying the image has neither a config nor an init")
	}
	wantLine(t, b, "kiln-init: workload exited with status 127")
	wantPowerOff(t, b)
}
