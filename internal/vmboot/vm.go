package vmboot

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// Result is how a VM ended.
type Result struct {
	// Console is everything the guest wrote to its console, with "\r\n"
	// line endings turned into "\n".
	Console string
	// Exited reports that QEMU exited by itself: the guest powered off,
	// rebooted or panicked, or QEMU failed (ExitCode is then not 0). It is
	// false when the VM was killed.
	Exited bool
	// ExitCode is QEMU's exit status when Exited.
	ExitCode int
	// Panicked reports that the console shows a kernel panic, e.g. because
	// init failed or exited.
	Panicked bool
	// Duration is how long QEMU ran.
	Duration time.Duration
	// Command is the QEMU command line, shell-quoted.
	Command string
}

// kernelPanic starts the message the kernel prints when it panics.
const kernelPanic = "Kernel panic - not syncing"

// outputLimit bounds how much of QEMU's own output is kept for errors.
const outputLimit = 64 << 10

// VM is a running QEMU process.
type VM struct {
	cfg     Config
	command string
	cmd     *exec.Cmd
	initrd  string // the initramfs Start built, if any
	output  *limitedBuffer
	started time.Time

	ctx    context.Context // ends when the VM must stop; its cause says why
	cancel func(cause error)

	done   chan struct{} // closed once QEMU has exited and result is set
	result Result
	err    error
}

// Run boots a VM and waits until QEMU exits, i.e. the guest powers off,
// reboots or panics. A VM that outlives cfg.Timeout or ctx is killed and Run
// returns an *Error, wrapping ErrTimeout or the context's error, that
// includes the QEMU command line and the end of the console. The Result is
// filled in either way.
func Run(ctx context.Context, cfg Config) (Result, error) {
	vm, err := Start(ctx, cfg)
	if err != nil {
		return Result{}, err
	}
	return vm.Wait()
}

// Start boots a VM and returns without waiting for it. The VM runs until
// the guest powers off, reboots or panics, Kill is called, or ctx or
// cfg.Timeout ends; Wait reports which. QEMU is also killed if this process
// dies, so no VM outlives it.
func Start(ctx context.Context, cfg Config) (vm *VM, err error) {
	cfg = cfg.withDefaults()
	if _, err := Command(cfg); err != nil {
		return nil, err
	}
	if err := cfg.checkFiles(); err != nil {
		return nil, fmt.Errorf("invalid VM config: %w", err)
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrQEMUNotFound, err)
	}
	// QEMU reads the initramfs when it starts; it goes when QEMU exits.
	initrd, err := buildInitramfs(cfg, filepath.Dir(cfg.ConsoleLog))
	if err != nil {
		return nil, fmt.Errorf("building the initramfs: %w", err)
	}
	defer func() {
		if vm == nil && initrd != "" {
			os.Remove(initrd)
		}
	}()
	args, err := command(cfg, initrd)
	if err != nil {
		return nil, err
	}
	args[0] = qemu

	// Start from an empty log so that nobody mistakes an earlier boot's
	// output for this one's.
	if err := os.WriteFile(cfg.ConsoleLog, nil, 0o644); err != nil {
		return nil, fmt.Errorf("creating console log: %w", err)
	}
	if err := removeSocket(cfg.AgentSocket); err != nil {
		return nil, err
	}

	vmCtx, cancel := context.WithCancelCause(ctx)
	stop := func() { cancel(nil) }
	if cfg.Timeout > 0 {
		var stopTimer context.CancelFunc
		vmCtx, stopTimer = context.WithTimeoutCause(vmCtx, cfg.Timeout, ErrTimeout)
		stop = func() { stopTimer(); cancel(nil) }
	}
	vm = &VM{
		cfg:     cfg,
		initrd:  initrd,
		command: shellQuote(args),
		output:  &limitedBuffer{max: outputLimit},
		ctx:     vmCtx,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	vm.cmd = exec.CommandContext(vmCtx, args[0], args[1:]...)
	vm.cmd.Stdout = vm.output
	vm.cmd.Stderr = vm.output
	vm.cmd.SysProcAttr = sysProcAttr()
	// QEMU starts no children, but do not hang on its pipes if it did.
	vm.cmd.WaitDelay = 5 * time.Second

	log.G(ctx).WithField("command", vm.command).Debug("starting VM")
	vm.started = time.Now()
	if err := vm.cmd.Start(); err != nil {
		stop()
		err := vm.newError(fmt.Errorf("starting QEMU: %w", err))
		vm = nil
		return nil, err
	}
	go vm.wait(stop)
	return vm, nil
}

// wait reaps QEMU and records how it ended.
func (vm *VM) wait(stop func()) {
	waitErr := vm.cmd.Wait()
	defer close(vm.done)
	defer stop()

	res := Result{
		Duration: time.Since(vm.started),
		Command:  vm.command,
	}
	console, err := readConsole(vm.cfg.ConsoleLog)
	if err != nil {
		log.G(vm.ctx).WithError(err).Warn("reading VM console log")
	}
	res.Console = console
	res.Panicked = strings.Contains(console, kernelPanic)
	if vm.initrd != "" {
		os.Remove(vm.initrd)
	}
	// QEMU deletes its socket on a clean exit but not when killed.
	if err := removeSocket(vm.cfg.AgentSocket); err != nil {
		log.G(vm.ctx).WithError(err).Warn("removing agent socket")
	}

	ps := vm.cmd.ProcessState
	switch {
	case ps == nil:
		// Wait failed before the process was reaped.
		vm.err = vm.newError(fmt.Errorf("waiting for QEMU: %w", waitErr))
	case ps.Exited():
		res.Exited = true
		res.ExitCode = ps.ExitCode()
		if res.ExitCode != 0 {
			vm.err = vm.newError(fmt.Errorf("QEMU exited with status %d", res.ExitCode))
		}
	case vm.ctx.Err() != nil:
		if cause := context.Cause(vm.ctx); !errors.Is(cause, errKilled) {
			vm.err = vm.newError(fmt.Errorf("VM killed after %s: %w", res.Duration.Round(time.Millisecond), cause))
		}
	default:
		vm.err = vm.newError(fmt.Errorf("QEMU ended unexpectedly: %s", ps))
	}
	vm.result = res
}

// Wait waits for QEMU to exit and returns how the VM ended. It returns an
// error if QEMU failed or the VM was killed for its timeout or context, but
// not if the caller killed it with Kill. It may be called more than once.
func (vm *VM) Wait() (Result, error) {
	<-vm.done
	return vm.result, vm.err
}

// Done is closed when QEMU has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Kill stops the VM at once, as pulling the plug would. Wait then reports
// Exited false and no error. Killing a VM that has ended does nothing.
func (vm *VM) Kill() { vm.cancel(errKilled) }

// Console returns what the guest has written to its console so far, with
// "\r\n" line endings turned into "\n".
func (vm *VM) Console() (string, error) {
	s, err := readConsole(vm.cfg.ConsoleLog)
	if err != nil {
		return "", fmt.Errorf("reading VM console: %w", err)
	}
	return s, nil
}

// WaitForLine waits until a console line matches pattern and returns it, as
// the package-level WaitForLine does, but also gives up if the VM ends
// without printing one.
func (vm *VM) WaitForLine(ctx context.Context, pattern *regexp.Regexp, timeout time.Duration) (string, error) {
	line, err := waitForLine(ctx, vm.cfg.ConsoleLog, pattern, timeout, vm.done)
	if e := (*Error)(nil); errors.As(err, &e) {
		e.Command = vm.command
		e.QEMUOutput = vm.output.String()
		if isClosed(vm.done) && vm.err != nil {
			// Say why the VM ended, e.g. its own timeout.
			e.Err = fmt.Errorf("%w: %w", e.Err, errors.Unwrap(vm.err))
		}
	}
	return line, err
}

// agentDialRetry is how often DialAgent retries while QEMU sets up the socket.
const agentDialRetry = 10 * time.Millisecond

// DialAgent connects to the guest agent serial port through
// Config.AgentSocket, waiting for QEMU to create the socket. The guest only
// starts once this connection exists. Closing the connection does not stop
// the VM; QEMU then accepts a new one.
func (vm *VM) DialAgent(ctx context.Context) (net.Conn, error) {
	if vm.cfg.AgentSocket == "" {
		return nil, errors.New("dialing guest agent: the VM has no agent socket")
	}
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", vm.cfg.AgentSocket)
		if err == nil {
			return conn, nil
		}
		if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("dialing guest agent: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dialing guest agent: %w", context.Cause(ctx))
		case <-vm.done:
			_, werr := vm.Wait()
			return nil, fmt.Errorf("dialing guest agent: VM ended before accepting a connection: %w", errors.Join(err, werr))
		case <-time.After(agentDialRetry):
		}
	}
}

func (vm *VM) newError(err error) *Error {
	return &Error{
		Err:         err,
		Command:     vm.command,
		QEMUOutput:  vm.output.String(),
		ConsoleLog:  vm.cfg.ConsoleLog,
		ConsoleTail: tailFile(vm.cfg.ConsoleLog),
	}
}

// removeSocket deletes a leftover unix socket at path, refusing to delete
// anything that is not a socket in case the path was mistyped.
func removeSocket(path string) error {
	if path == "" {
		return nil
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking agent socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("agent socket path %s exists and is not a socket", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing old agent socket: %w", err)
	}
	return nil
}

// limitedBuffer keeps the first max bytes written to it and drops the rest;
// QEMU prints little, and only the start of a flood is useful.
type limitedBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - len(b.buf); room > 0 {
		b.buf = append(b.buf, p[:min(len(p), room)]...)
	}
	return len(p), nil
}

func (b *limitedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
