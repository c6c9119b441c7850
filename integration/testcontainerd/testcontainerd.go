// Package testcontainerd runs a real containerd daemon with kiln serve
// plugged in as its proxy snapshotter and differ, both with private state
// under one short temporary directory: their own root, state, sockets and
// logs, nothing shared with a containerd the host may run.
package testcontainerd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/integration/testimage"
)

// ErrUnavailable wraps the reason containerd cannot run here.
var ErrUnavailable = errors.New("containerd unavailable")

var binaries struct {
	once sync.Once
	dir  string
	err  error
}

// The programs built from the versions go.mod pins, by package.
var programs = []struct {
	name, pkg string
	tags      string
}{
	{"containerd", "github.com/containerd/containerd/v2/cmd/containerd", "no_btrfs no_devmapper no_zfs"},
	{"ctr", "github.com/containerd/containerd/v2/cmd/ctr", ""},
	{"containerd-shim-runc-v2", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2", ""},
	{"crictl", "sigs.k8s.io/cri-tools/cmd/crictl", ""},
}

// BinDir returns the directory with containerd, ctr, containerd's runc
// shim and crictl (bin/ under testimage.CacheDir()), building them there
// from the versions go.mod pins if they are missing.
func BinDir() (string, error) {
	b := &binaries
	b.once.Do(func() {
		b.dir = filepath.Join(testimage.CacheDir(), "bin")
		b.err = build(b.dir)
	})
	return b.dir, b.err
}

// build compiles what is missing into dir, serialised across processes
// by a lock file, each binary renamed into place when complete.
func build(dir string) error {
	missing := false
	for _, p := range programs {
		missing = missing || !exists(filepath.Join(dir, p.name))
	}
	if !missing {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".containerd.lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	for _, p := range programs {
		out := filepath.Join(dir, p.name)
		if exists(out) {
			continue
		}
		args := []string{"build", "-o", out + ".tmp"}
		if p.tags != "" {
			args = append(args, "-tags", p.tags)
		}
		if msg, err := exec.Command(goBin, append(args, p.pkg)...).CombinedOutput(); err != nil {
			return fmt.Errorf("%w: building %s: %v\n%s", ErrUnavailable, p.name, err, msg)
		}
		if err := os.Rename(out+".tmp", out); err != nil {
			return err
		}
	}
	return nil
}

// Options configure Start.
type Options struct {
	// Kiln is the kiln binary.
	Kiln string
	// KilnRoot is kiln's state directory (default: one under Env.Dir).
	KilnRoot string
	// WalkingDiffer makes containerd unpack into kiln's snapshotter with
	// its own walking differ instead of kiln's.
	WalkingDiffer bool
	// DiffService puts kiln's differ first in containerd's diff service
	// (kiln containerd-config --diff-service), for Compare.
	DiffService bool
	// BlockDevices turns on kiln's block-device mode.
	BlockDevices bool
	// Inject lists the guest pieces kiln adds to every image.
	Inject []string
	// Writer is kiln's ext4 writer ("" for kiln's default).
	Writer string
	// ContainerMode is kiln's container mode ("" for kiln's default).
	ContainerMode string
	// UnusedDiskGrace is kiln's grace for disks nothing needs ("" for
	// kiln's default).
	UnusedDiskGrace string
	// Metrics makes kiln serve Prometheus metrics on a free port of
	// 127.0.0.1 (Env.MetricsAddress).
	Metrics bool
	// MaxConcurrentUnpacks is how many layers containerd's transfer
	// service unpacks at once (0 for containerd's default, one).
	MaxConcurrentUnpacks int
	// CRI keeps containerd's CRI plugin, with a runtime handler "kiln"
	// (runc, snapshotter kiln) and SandboxImage as the pod sandbox image.
	CRI          bool
	SandboxImage string
	// Config is more TOML for kiln's configuration, after the rest
	// (tables only, such as "[share]\npull = true\n").
	Config string
	// KilnEnv adds variables to kiln serve's environment
	// ("DOCKER_CONFIG=...").
	KilnEnv []string
}

// Env is a running containerd and kiln serve.
type Env struct {
	// Dir holds everything; its name is short, for the sockets.
	Dir string
	// Address is containerd's socket.
	Address string
	// KilnAddress is kiln's socket, KilnRoot its state directory and
	// KilnConfig its configuration file.
	KilnAddress, KilnRoot, KilnConfig string
	// ContainerdRoot is containerd's root directory.
	ContainerdRoot string
	// MetricsAddress is where kiln serves its metrics (host:port), with
	// Options.Metrics.
	MetricsAddress string

	opts   Options
	binDir string

	mu         sync.Mutex
	kiln       *proc
	containerd *proc
	kilnRuns   int
	ctdRuns    int
}

type proc struct {
	cmd      *exec.Cmd
	log      string
	done     chan struct{}
	err      error
	stopping bool // signalled by stop; only read and set by the test
}

// Start starts kiln serve, then containerd as users run it: from
// `containerd config default`, with kiln's drop-in from `kiln
// containerd-config` in the conf.d its imports name. Every path is moved
// under one private directory.
func Start(opts Options) (_ *Env, err error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: needs root", ErrUnavailable)
	}
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	// Unix socket paths must stay under 108 bytes: a short directory.
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		return nil, err
	}
	e := &Env{
		Dir:            dir,
		Address:        filepath.Join(dir, "c.sock"),
		KilnAddress:    filepath.Join(dir, "k.sock"),
		KilnRoot:       filepath.Join(dir, "kiln"),
		KilnConfig:     filepath.Join(dir, "kiln.toml"),
		ContainerdRoot: filepath.Join(dir, "root"),
		opts:           opts,
		binDir:         bin,
	}
	if opts.KilnRoot != "" {
		e.KilnRoot = opts.KilnRoot
	}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	kcfg := fmt.Sprintf("version = 1\nroot = %q\naddress = %q\ncontainerd_address = %q\nlog_level = \"debug\"\n",
		e.KilnRoot, e.KilnAddress, e.Address)
	if opts.Metrics {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		e.MetricsAddress = ln.Addr().String()
		ln.Close()
		kcfg += fmt.Sprintf("metrics_address = %q\n", e.MetricsAddress)
	}
	kcfg += fmt.Sprintf("\n[snapshotter]\nblock_devices = %v\n", opts.BlockDevices)
	if opts.ContainerMode != "" {
		kcfg += fmt.Sprintf("container_mode = %q\n", opts.ContainerMode)
	}
	if opts.UnusedDiskGrace != "" {
		kcfg += fmt.Sprintf("unused_disk_grace = %q\n", opts.UnusedDiskGrace)
	}
	if len(opts.Inject) > 0 || opts.Writer != "" {
		kcfg += "\n[build]\n"
	}
	if len(opts.Inject) > 0 {
		pieces, _ := json.Marshal(opts.Inject) // a TOML array of strings too
		kcfg += fmt.Sprintf("inject = %s\n", pieces)
	}
	if opts.Writer != "" {
		kcfg += fmt.Sprintf("writer = %q\n", opts.Writer)
	}
	if opts.Config != "" {
		kcfg += "\n" + opts.Config
	}
	if err := os.WriteFile(e.KilnConfig, []byte(kcfg), 0o600); err != nil {
		return nil, err
	}
	main, err := e.containerdConfig()
	if err != nil {
		return nil, err
	}
	mainPath := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(mainPath, []byte(main), 0o600); err != nil {
		return nil, err
	}
	dropIn := filepath.Join(dir, "conf.d", "kiln.toml")
	args := []string{"containerd-config", "--config", e.KilnConfig, "-o", dropIn, "--containerd-config", mainPath}
	if opts.DiffService {
		args = append(args, "--diff-service")
	}
	if out, err := exec.Command(opts.Kiln, args...).CombinedOutput(); err != nil || len(out) > 0 {
		return nil, fmt.Errorf("kiln containerd-config: %v: %s", err, out)
	}
	if opts.WalkingDiffer {
		if err := useWalkingDiffer(dropIn); err != nil {
			return nil, err
		}
	}
	if opts.CRI {
		if err := e.writeCRIConfig(); err != nil {
			return nil, err
		}
	}
	if err := e.StartKiln(); err != nil {
		return nil, err
	}
	if err := e.StartContainerd(); err != nil {
		return nil, err
	}
	return e, nil
}

// useWalkingDiffer turns kiln's drop-in into one where containerd's
// walking differ fills kiln's snapshots, for pulls through the transfer
// service and client-side ones alike.
func useWalkingDiffer(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	f := string(b)
	const kilnDiffer = `differ = "kiln-diff"`
	if !strings.Contains(f, kilnDiffer) {
		return fmt.Errorf("kiln's drop-in has no %s:\n%s", kilnDiffer, f)
	}
	f = strings.ReplaceAll(f, kilnDiffer, `differ = "walking"`)
	f = strings.ReplaceAll(f, `default = ["kiln-diff", "walking"]`, `default = ["walking"]`)
	return os.WriteFile(path, []byte(f), 0o600)
}

// writeCRIConfig adds the CRI settings a pod needs here: a runtime
// handler "kiln" (runc, with kiln's snapshotter), the sandbox image, and
// CNI directories of the test's own (pods use the host's network).
func (e *Env) writeCRIConfig() error {
	d := e.Dir
	for _, sub := range []string{"cni/net.d", "cni/bin"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return err
		}
	}
	cfg := fmt.Sprintf(`version = 3

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %q

[plugins.'io.containerd.cri.v1.runtime']
  # Containers may not get a lower oom_score_adj than containerd's: the
  # machines the suite runs on may not grant CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kiln]
  runtime_type = 'io.containerd.runc.v2'
  snapshotter = 'kiln'
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kiln.options]
    Root = %q

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  Root = %q

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = [%q]
  conf_dir = %q
`, e.opts.SandboxImage, e.RuncRoot(), e.RuncRoot(), filepath.Join(d, "cni/bin"), filepath.Join(d, "cni/net.d"))
	if err := os.WriteFile(filepath.Join(d, "crictl.yaml"), nil, 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(d, "conf.d", "cri.toml"), []byte(cfg), 0o600)
}

// containerdConfig is `containerd config default` with every path that
// containerd, its CRI plugin or NRI would use moved under e.Dir, debug
// logs, and, unless CRI is wanted, the CRI plugins disabled.
func (e *Env) containerdConfig() (string, error) {
	out, err := exec.Command(filepath.Join(e.binDir, "containerd"), "config", "default").Output()
	if err != nil {
		return "", fmt.Errorf("containerd config default: %w", err)
	}
	cfg := string(out)
	d := e.Dir
	for _, r := range [][2]string{
		{"root = '/var/lib/containerd'", fmt.Sprintf("root = %q", e.ContainerdRoot)},
		{"state = '/run/containerd'", fmt.Sprintf("state = %q", filepath.Join(d, "state"))},
		{"temp = ''", fmt.Sprintf("temp = %q", filepath.Join(d, "tmp"))},
		{"imports = ['/etc/containerd/conf.d/*.toml']", fmt.Sprintf("imports = [%q]", filepath.Join(d, "conf.d", "*.toml"))},
		{"address = '/run/containerd/containerd.sock'", fmt.Sprintf("address = %q", e.Address)},
		{"address = '/run/containerd/containerd.sock.ttrpc'", fmt.Sprintf("address = %q", e.Address+".ttrpc")},
		{"path = '/opt/containerd'", fmt.Sprintf("path = %q", filepath.Join(d, "opt"))},
		{"bin_dir = '/opt/containerd/image-verifier/bin'", fmt.Sprintf("bin_dir = %q", filepath.Join(d, "verifiers"))},
		{"socket_path = '/var/run/nri/nri.sock'", fmt.Sprintf("socket_path = %q", filepath.Join(d, "nri.sock"))},
		{"plugin_path = '/opt/nri/plugins'", fmt.Sprintf("plugin_path = %q", filepath.Join(d, "nri"))},
		{"plugin_config_path = '/etc/nri/conf.d'", fmt.Sprintf("plugin_config_path = %q", filepath.Join(d, "nri"))},
		{"[debug]\n  level = ''", "[debug]\n  level = 'debug'"},
		// Shims' sockets, under /run/containerd by default.
		{"socket_dir = ''", fmt.Sprintf("socket_dir = %q", filepath.Join(d, "s"))},
	} {
		if !strings.Contains(cfg, r[0]) {
			return "", fmt.Errorf("containerd config default has no %q", r[0])
		}
		cfg = strings.ReplaceAll(cfg, r[0], r[1])
	}
	if n := e.opts.MaxConcurrentUnpacks; n > 0 {
		const def = "max_concurrent_unpacks = 1"
		if !strings.Contains(cfg, def) {
			return "", fmt.Errorf("containerd config default has no %q", def)
		}
		cfg = strings.Replace(cfg, def, fmt.Sprintf("max_concurrent_unpacks = %d", n), 1)
	}
	disabled := []string{"io.containerd.nri.v1.nri"}
	if !e.opts.CRI {
		disabled = append(disabled,
			"io.containerd.grpc.v1.cri",
			"io.containerd.cri.v1.images",
			"io.containerd.cri.v1.runtime",
			"io.containerd.podsandbox.controller.v1.podsandbox",
		)
	}
	quoted, _ := json.Marshal(disabled)
	cfg = strings.Replace(cfg, "disabled_plugins = []", "disabled_plugins = "+string(quoted), 1)
	for _, sub := range []string{"tmp", "conf.d"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o700); err != nil {
			return "", err
		}
	}
	return cfg, nil
}

// StartContainerd starts containerd (again, after StopContainerd) and
// waits until it answers.
func (e *Env) StartContainerd() error {
	e.mu.Lock()
	e.ctdRuns++
	logf := filepath.Join(e.Dir, fmt.Sprintf("containerd.%d.log", e.ctdRuns))
	e.mu.Unlock()
	p, err := startProc(filepath.Join(e.binDir, "containerd"), logf, e.path(), nil, "--config", filepath.Join(e.Dir, "containerd.toml"))
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.containerd = p
	e.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if p.exited() {
			return fmt.Errorf("containerd exited: %v\n%s", p.err, tailFile(p.log))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := e.Ctr(ctx, "version")
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd did not come up: %v\n%s", err, tailFile(p.log))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// StopContainerd stops containerd with SIGTERM.
func (e *Env) StopContainerd() error {
	e.mu.Lock()
	p := e.containerd
	e.mu.Unlock()
	return e.stop(p, syscall.SIGTERM, 30*time.Second)
}

// KillContainerd kills containerd with SIGKILL.
func (e *Env) KillContainerd() {
	e.mu.Lock()
	p := e.containerd
	e.mu.Unlock()
	e.stop(p, syscall.SIGKILL, 10*time.Second) //nolint:errcheck // killed
}

// RuncRoot is runc's state directory for this containerd's containers
// (ctr run --runc-root): never the host's /run/containerd/runc.
func (e *Env) RuncRoot() string { return filepath.Join(e.Dir, "runc") }

// FIFODir is where ctr makes a task's IO fifos (ctr run --fifo-dir):
// never the host's /run/containerd/fifo.
func (e *Env) FIFODir() string { return filepath.Join(e.Dir, "fifo") }

// path is the PATH containerd runs with: the test binaries (its runc
// shim) first, then the system's, sbin included (runc).
func (e *Env) path() string {
	return e.binDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

// StartKiln starts kiln serve (again, after StopKiln or KillKiln) and
// waits until it accepts connections.
func (e *Env) StartKiln() error {
	e.mu.Lock()
	e.kilnRuns++
	logf := filepath.Join(e.Dir, fmt.Sprintf("kiln.%d.log", e.kilnRuns))
	e.mu.Unlock()
	p, err := startProc(e.opts.Kiln, logf, os.Getenv("PATH"), e.opts.KilnEnv, "serve", "--config", e.KilnConfig, "--log-level", "debug")
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.kiln = p
	e.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if p.exited() {
			return fmt.Errorf("kiln serve exited: %v\n%s", p.err, tailFile(p.log))
		}
		// kiln replaces a stale socket, so a connection means it is up.
		if c, err := net.DialTimeout("unix", e.KilnAddress, time.Second); err == nil {
			c.Close()
			if strings.Contains(readFile(p.log), "kiln serving") {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kiln serve did not come up\n%s", tailFile(p.log))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StopKiln stops kiln serve with SIGTERM and returns its exit error.
func (e *Env) StopKiln() error { return e.stop(e.kilnProc(), syscall.SIGTERM, 30*time.Second) }

// KillKiln kills kiln serve with SIGKILL.
func (e *Env) KillKiln() { e.stop(e.kilnProc(), syscall.SIGKILL, 10*time.Second) } //nolint:errcheck // killed

// KilnRunning says whether kiln serve is still running.
func (e *Env) KilnRunning() bool {
	p := e.kilnProc()
	return p != nil && !p.exited()
}

func (e *Env) kilnProc() *proc {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.kiln
}

// KilnLog returns what the running (or last) kiln serve logged.
func (e *Env) KilnLog() string {
	if p := e.kilnProc(); p != nil {
		return readFile(p.log)
	}
	return ""
}

// KilnLogs returns what every kiln serve of this environment logged.
func (e *Env) KilnLogs() string {
	e.mu.Lock()
	n := e.kilnRuns
	e.mu.Unlock()
	return e.logs("kiln", n)
}

// ContainerdLog returns what every containerd of this environment logged.
func (e *Env) ContainerdLog() string {
	e.mu.Lock()
	n := e.ctdRuns
	e.mu.Unlock()
	return e.logs("containerd", n)
}

// logs concatenates the logs of a program's n runs.
func (e *Env) logs(name string, n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		b.WriteString(readFile(filepath.Join(e.Dir, fmt.Sprintf("%s.%d.log", name, i))))
	}
	return b.String()
}

// Crictl runs crictl against this containerd's CRI plugin and returns its
// standard output; its standard error is in the error.
func (e *Env) Crictl(ctx context.Context, args ...string) (string, error) {
	endpoint := "unix://" + e.Address
	cmd := exec.CommandContext(ctx, filepath.Join(e.binDir, "crictl"), append([]string{
		"--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "2m",
		"--config", filepath.Join(e.Dir, "crictl.yaml"),
	}, args...)...)
	cmd.Env = environ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return string(out), err
}

// Ctr runs ctr against this containerd and returns its combined output
// (minus the cgroup v1 deprecation warning every call prints).
func (e *Env) Ctr(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(e.binDir, "ctr"), append([]string{"--address", e.Address}, args...)...)
	cmd.Env = environ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return dropWarnings(out.String()), err
}

// environ is the test's environment without the named variables.
func environ(drop ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		keep := true
		for _, d := range drop {
			keep = keep && name != d
		}
		if keep {
			out = append(out, kv)
		}
	}
	return out
}

func dropWarnings(s string) string {
	var keep []string
	for _, l := range strings.SplitAfter(s, "\n") {
		if strings.Contains(l, "level=warning") && strings.Contains(l, "cgroup v1 is deprecated") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "")
}

// Close stops containerd and kiln, unmounts and detaches whatever is left
// under Dir, and removes it.
func (e *Env) Close() error {
	e.mu.Lock()
	ctd, kiln := e.containerd, e.kiln
	e.mu.Unlock()
	var first error
	if err := e.stop(ctd, syscall.SIGTERM, 20*time.Second); err != nil && first == nil {
		first = fmt.Errorf("containerd: %w", err)
	}
	if err := e.stop(kiln, syscall.SIGTERM, 30*time.Second); err != nil && first == nil {
		first = fmt.Errorf("kiln serve: %w", err)
	}
	unmountUnder(e.Dir)
	DetachLoops(e.Dir)
	if err := os.RemoveAll(e.Dir); err != nil && first == nil {
		first = err
	}
	return first
}

// stop signals p and waits for it, killing it (and what it started) after
// timeout. A process that exits on SIGTERM with status 0, or that was
// stopped before, is no error; one that exited by itself is.
func (e *Env) stop(p *proc, sig syscall.Signal, timeout time.Duration) error {
	if p == nil {
		return nil
	}
	if p.stopping {
		<-p.done
		return nil
	}
	p.stopping = true
	if p.exited() {
		return fmt.Errorf("exited by itself: %v\n%s", p.err, tailFile(p.log))
	}
	p.cmd.Process.Signal(sig) //nolint:errcheck // it may be gone
	select {
	case <-p.done:
	case <-time.After(timeout):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) //nolint:errcheck // best effort
		<-p.done
		return fmt.Errorf("did not stop within %v after %v", timeout, sig)
	}
	if sig == syscall.SIGKILL {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) //nolint:errcheck // its children, if any
		return nil
	}
	return p.err
}

func startProc(bin, logFile, path string, env []string, args ...string) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(append(environ("NOTIFY_SOCKET", "PATH"), "PATH="+path), env...)
	// Its own process group: signals to the test do not reach it, and
	// everything it started can be killed with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	p := &proc{cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// unmountUnder lazily unmounts every mount point below dir, deepest first.
func unmountUnder(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	prefix := filepath.Clean(dir) + "/"
	var points []string
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && strings.HasPrefix(unescapeMountinfo(f[4]), prefix) {
			points = append(points, unescapeMountinfo(f[4]))
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		unix.Unmount(points[i], unix.MNT_DETACH) //nolint:errcheck // best effort
	}
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// LoopDevices maps the loop devices backed by files under dir to their
// backing files.
func LoopDevices(dir string) map[string]string {
	out := map[string]string{}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	prefix := filepath.Clean(dir) + "/"
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		f := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if strings.HasPrefix(f, prefix) {
			out["/dev/"+filepath.Base(filepath.Dir(filepath.Dir(p)))] = f
		}
	}
	return out
}

// DetachLoops detaches the loop devices backed by files under dir.
func DetachLoops(dir string) {
	for dev := range LoopDevices(dir) {
		exec.Command("losetup", "-d", dev).Run() //nolint:errcheck // best effort
	}
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func tailFile(p string) string {
	s := readFile(p)
	if len(s) > 4000 {
		s = "..." + s[len(s)-4000:]
	}
	return s
}
