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
	once            sync.Once
	containerd, ctr string
	err             error
}

// Binaries returns containerd and ctr from the test cache (bin/ under
// testimage.CacheDir()), building them there from the versions go.mod
// pins if they are missing.
func Binaries() (containerd, ctr string, err error) {
	b := &binaries
	b.once.Do(func() {
		dir := filepath.Join(testimage.CacheDir(), "bin")
		b.containerd, b.ctr = filepath.Join(dir, "containerd"), filepath.Join(dir, "ctr")
		if exists(b.containerd) && exists(b.ctr) {
			return
		}
		b.err = build(dir)
	})
	return b.containerd, b.ctr, b.err
}

// build compiles containerd and ctr into dir, serialised across processes
// by a lock file, each binary renamed into place when complete.
func build(dir string) error {
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
	for _, b := range []struct {
		name string
		args []string
	}{
		{"containerd", []string{"-tags", "no_btrfs no_devmapper no_zfs", "github.com/containerd/containerd/v2/cmd/containerd"}},
		{"ctr", []string{"github.com/containerd/containerd/v2/cmd/ctr"}},
	} {
		out := filepath.Join(dir, b.name)
		if exists(out) {
			continue
		}
		args := append([]string{"build", "-o", out + ".tmp"}, b.args...)
		if msg, err := exec.Command(goBin, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("%w: building %s: %v\n%s", ErrUnavailable, b.name, err, msg)
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
	// WalkingDiffer makes containerd unpack into kiln's snapshotter with
	// its own walking differ instead of kiln's.
	WalkingDiffer bool
	// BlockDevices turns on kiln's block-device mode.
	BlockDevices bool
	// Inject lists the guest pieces kiln adds to every image.
	Inject []string
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

	opts          Options
	ctrBin        string
	containerdBin string

	mu         sync.Mutex
	kiln       *proc
	containerd *proc
	kilnRuns   int
}

type proc struct {
	cmd      *exec.Cmd
	log      string
	done     chan struct{}
	err      error
	stopping bool // signalled by stop; only read and set by the test
}

// Start starts kiln serve, then containerd configured with the fragment
// `kiln containerd-config` prints.
func Start(opts Options) (_ *Env, err error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: needs root", ErrUnavailable)
	}
	ctd, ctr, err := Binaries()
	if err != nil {
		return nil, err
	}
	// Unix socket paths must stay under 108 bytes: a short directory.
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		return nil, err
	}
	e := &Env{
		Dir:           dir,
		Address:       filepath.Join(dir, "c.sock"),
		KilnAddress:   filepath.Join(dir, "k.sock"),
		KilnRoot:      filepath.Join(dir, "kiln"),
		KilnConfig:    filepath.Join(dir, "kiln.toml"),
		opts:          opts,
		ctrBin:        ctr,
		containerdBin: ctd,
	}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	kcfg := fmt.Sprintf("version = 1\nroot = %q\naddress = %q\ncontainerd_address = %q\nlog_level = \"debug\"\n\n[snapshotter]\nblock_devices = %v\n",
		e.KilnRoot, e.KilnAddress, e.Address, opts.BlockDevices)
	if len(opts.Inject) > 0 {
		pieces, _ := json.Marshal(opts.Inject) // a TOML array of strings too
		kcfg += fmt.Sprintf("\n[build]\ninject = %s\n", pieces)
	}
	if err := os.WriteFile(e.KilnConfig, []byte(kcfg), 0o600); err != nil {
		return nil, err
	}
	frag, err := exec.Command(opts.Kiln, "containerd-config", "--config", e.KilnConfig, "--address", e.KilnAddress).Output()
	if err != nil {
		return nil, fmt.Errorf("kiln containerd-config: %w", err)
	}
	fragment := string(frag)
	if opts.WalkingDiffer {
		if fragment, err = walkingFragment(fragment); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "containerd.toml"), []byte(e.containerdConfig()+"\n"+fragment), 0o600); err != nil {
		return nil, err
	}
	if err := e.StartKiln(); err != nil {
		return nil, err
	}
	if err := e.startContainerd(); err != nil {
		return nil, err
	}
	return e, nil
}

// walkingFragment turns kiln's fragment into one where containerd's
// walking differ fills kiln's snapshots, for pulls through the transfer
// service and client-side ones alike.
func walkingFragment(f string) (string, error) {
	for _, r := range [][2]string{
		{`differ = "kiln-diff"`, `differ = "walking"`},
		{`default = ["kiln-diff", "walking"]`, `default = ["walking"]`},
	} {
		if !strings.Contains(f, r[0]) {
			return "", fmt.Errorf("kiln containerd-config output has no %s:\n%s", r[0], f)
		}
		f = strings.ReplaceAll(f, r[0], r[1])
	}
	return f, nil
}

// containerdConfig keeps every path containerd would use under e.Dir and
// leaves out the plugins a pull does not need (CRI, NRI, tracing), some of
// which would touch host paths.
func (e *Env) containerdConfig() string {
	d := e.Dir
	return fmt.Sprintf(`version = 3
root = %q
state = %q
temp = %q
imports = []
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.image-verifier.v1.bindir",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "debug"

[plugins.'io.containerd.internal.v1.opt']
  path = %q
`, filepath.Join(d, "root"), filepath.Join(d, "state"), filepath.Join(d, "tmp"),
		e.Address, e.Address+".ttrpc", filepath.Join(d, "opt"))
}

func (e *Env) startContainerd() error {
	if err := os.MkdirAll(filepath.Join(e.Dir, "tmp"), 0o700); err != nil {
		return err
	}
	p, err := startProc(e.containerdBin, filepath.Join(e.Dir, "containerd.log"), "--config", filepath.Join(e.Dir, "containerd.toml"))
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

// StartKiln starts kiln serve (again, after StopKiln or KillKiln) and
// waits until it accepts connections.
func (e *Env) StartKiln() error {
	e.mu.Lock()
	e.kilnRuns++
	logf := filepath.Join(e.Dir, fmt.Sprintf("kiln.%d.log", e.kilnRuns))
	e.mu.Unlock()
	p, err := startProc(e.opts.Kiln, logf, "serve", "--config", e.KilnConfig, "--log-level", "debug")
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
	var b strings.Builder
	e.mu.Lock()
	n := e.kilnRuns
	e.mu.Unlock()
	for i := 1; i <= n; i++ {
		b.WriteString(readFile(filepath.Join(e.Dir, fmt.Sprintf("kiln.%d.log", i))))
	}
	return b.String()
}

// ContainerdLog returns what containerd logged.
func (e *Env) ContainerdLog() string { return readFile(filepath.Join(e.Dir, "containerd.log")) }

// Ctr runs ctr against this containerd and returns its combined output
// (minus the cgroup v1 deprecation warning every call prints).
func (e *Env) Ctr(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, e.ctrBin, append([]string{"--address", e.Address}, args...)...)
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

func startProc(bin, logFile string, args ...string) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = environ("NOTIFY_SOCKET")
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
