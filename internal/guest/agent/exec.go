package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// execWaitDelay bounds how long an exec waits for its output pipes after the
// command exits, in case a background process it started keeps them open.
const execWaitDelay = 2 * time.Second

func (s *Server) exec(ctx context.Context, req *ExecRequest) (*ExecResult, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, errors.New("exec: argv is empty")
	}
	env := mergeEnv(os.Environ(), req.Env)
	dir := req.Dir
	if dir == "" {
		dir = "/"
	}
	path, err := lookPath(req.Argv[0], dir, envValue(env, "PATH"))
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}

	if req.TimeoutMS > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutMS)*time.Millisecond)
		defer cancel()
	}
	limit := s.MaxOutput
	if limit <= 0 {
		limit = DefaultMaxOutput
	}
	stdout := &cappedBuffer{max: limit}
	stderr := &cappedBuffer{max: limit}

	cmd := exec.CommandContext(ctx, path)
	cmd.Args = req.Argv
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(req.Stdin)
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	// Its own process group, so a timeout kills what it started too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = execWaitDelay

	err = cmd.Run()
	if cmd.ProcessState == nil {
		return nil, fmt.Errorf("exec %s: %w", req.Argv[0], err)
	}
	result := &ExecResult{
		Stdout:          stdout.bytes(),
		Stderr:          stderr.bytes(),
		StdoutTruncated: stdout.truncated,
		StderrTruncated: stderr.truncated,
		TimedOut:        errors.Is(ctx.Err(), context.DeadlineExceeded),
	}
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		result.ExitCode = -1
		result.Signal = unix.SignalName(ws.Signal())
	} else {
		result.ExitCode = ws.ExitStatus()
	}
	return result, nil
}

// mergeEnv returns base with the KEY=VALUE entries of extra added, replacing
// entries of base with the same key.
func mergeEnv(base, extra []string) []string {
	if len(extra) == 0 {
		return base
	}
	override := map[string]bool{}
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		override[k] = true
	}
	env := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		if k, _, _ := strings.Cut(kv, "="); !override[k] {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath finds name in pathEnv the way the command's own environment
// would, rather than the agent's; a name with a slash is taken relative to
// dir.
func lookPath(name, dir, pathEnv string) (string, error) {
	if strings.Contains(name, "/") {
		if !filepath.IsAbs(name) {
			name = filepath.Join(dir, name)
		}
		return name, nil
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable %q not found in PATH %q", name, pathEnv)
}
