package initproc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/power"
)

// ForwardedSignals are passed on to the workload when kiln-init receives
// them.
var ForwardedSignals = []os.Signal{unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2}

// Action is what to do with the machine once the workload has stopped.
type Action int

const (
	PowerOff Action = iota
	Reboot
)

func (a Action) String() string {
	if a == Reboot {
		return "reboot"
	}
	return "power-off"
}

// DefaultStopGrace is how long the workload may take to exit after a
// shutdown request before it is killed.
const DefaultStopGrace = 10 * time.Second

// Supervisor does PID 1's process bookkeeping. It is the only caller of
// wait(2) in the process, so it reaps every child: the workload, background
// services it started, and orphans the kernel re-parents to PID 1.
type Supervisor struct {
	logf       func(string, ...any)
	signals    chan os.Signal
	background map[int]string
	// StopGrace is how long the workload gets to exit after a power-off
	// or reboot request (power.SignalPowerOff, power.SignalReboot).
	StopGrace time.Duration
}

// NewSupervisor starts catching SIGCHLD, the forwarded signals and the
// shutdown signals. Call it before starting any process, so that no exit
// is missed, and Close it when done.
func NewSupervisor(logf func(string, ...any)) *Supervisor {
	s := &Supervisor{
		logf:       logf,
		signals:    make(chan os.Signal, 64),
		background: map[int]string{},
		StopGrace:  DefaultStopGrace,
	}
	sigs := append([]os.Signal{unix.SIGCHLD, power.SignalPowerOff, power.SignalReboot}, ForwardedSignals...)
	signal.Notify(s.signals, sigs...)
	return s
}

// Close stops catching signals.
func (s *Supervisor) Close() { signal.Stop(s.signals) }

// StartBackground starts a service such as the agent next to the workload.
// Its exit is logged when reaped; nothing waits for it.
func (s *Supervisor) StartBackground(name string, cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	s.background[cmd.Process.Pid] = name
	return nil
}

// Run starts the workload and supervises it until it exits, returning its
// wait status and the action requested meanwhile: PowerOff unless a reboot
// was asked for. A start failure is returned as an error.
func (s *Supervisor) Run(cmd *exec.Cmd) (unix.WaitStatus, Action, error) {
	if err := cmd.Start(); err != nil {
		return 0, PowerOff, err
	}
	pid := cmd.Process.Pid
	action := PowerOff
	var kill <-chan time.Time

	// The workload may have exited before its SIGCHLD was queued for us.
	if ws, done := s.reap(pid); done {
		return ws, action, nil
	}
	for {
		select {
		case sig := <-s.signals:
			switch sig {
			case unix.SIGCHLD:
				if ws, done := s.reap(pid); done {
					return ws, action, nil
				}
			case power.SignalPowerOff, power.SignalReboot:
				if sig == power.SignalReboot {
					action = Reboot
				}
				s.logf("%s requested; stopping the workload", action)
				_ = unix.Kill(pid, unix.SIGTERM)
				if kill == nil {
					kill = time.After(s.StopGrace)
				}
			default:
				_ = unix.Kill(pid, sig.(syscall.Signal))
			}
		case <-kill:
			s.logf("the workload did not stop within %s; killing it", s.StopGrace)
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// reap collects every child that has exited and reports whether the
// workload pid was among them, with its status.
func (s *Supervisor) reap(workload int) (unix.WaitStatus, bool) {
	var (
		status unix.WaitStatus
		found  bool
	)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return status, found
		}
		switch name, ok := s.background[pid]; {
		case pid == workload:
			status, found = ws, true
		case ok:
			delete(s.background, pid)
			s.logf("%s (pid %d) %s", name, pid, describe(ws))
		}
	}
}

func describe(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "was killed by signal " + signalName(ws.Signal())
	}
	return fmt.Sprintf("exited with status %d", ws.ExitStatus())
}

// StopAll ends every remaining process: SIGTERM, up to grace to exit, then
// SIGKILL. Only PID 1 may do this, since kill(-1) reaches every process it
// may signal; elsewhere it does nothing.
func (s *Supervisor) StopAll(grace time.Duration) {
	if os.Getpid() != 1 {
		return
	}
	// Exits from here on are expected; stop reporting them.
	s.background = map[int]string{}
	if s.waitAll(unix.SIGTERM, grace) {
		return
	}
	s.waitAll(unix.SIGKILL, 2*time.Second)
}

// waitAll signals every process and reaps until none is left or the timeout
// passes, reporting whether none is left.
func (s *Supervisor) waitAll(sig unix.Signal, timeout time.Duration) bool {
	if err := unix.Kill(-1, sig); errors.Is(err, unix.ESRCH) {
		return true // no process left to signal
	}
	deadline := time.Now().Add(timeout)
	for {
		s.reap(0)
		if _, err := unix.Wait4(-1, nil, unix.WNOHANG, nil); errors.Is(err, unix.ECHILD) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
