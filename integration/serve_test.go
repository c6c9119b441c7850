package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serveEnv is a kiln serve configuration of a test's own: its root, its
// socket in a directory of its own, and a containerd socket nobody serves
// (kiln connects to containerd lazily, so it starts without one).
type serveEnv struct {
	dir, config, root, socket string
}

func newServeEnv(t *testing.T, extra string) serveEnv {
	t.Helper()
	dir := t.TempDir()
	e := serveEnv{
		dir:    dir,
		config: filepath.Join(dir, "kiln.toml"),
		root:   filepath.Join(dir, "root"),
		socket: filepath.Join(dir, "run", "k.sock"),
	}
	e.writeConfig(t, extra)
	return e
}

func (e serveEnv) writeConfig(t *testing.T, extra string) {
	t.Helper()
	cfg := fmt.Sprintf("version = 1\nroot = %q\naddress = %q\ncontainerd_address = %q\n%s",
		e.root, e.socket, filepath.Join(e.dir, "containerd.sock"), extra)
	if err := os.WriteFile(e.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// serving is a kiln serve that came up.
type serving struct {
	cmd  *exec.Cmd
	log  string
	done chan error
}

// startServe starts kiln serve and waits until it serves on its socket.
func startServe(t *testing.T, e serveEnv) *serving {
	t.Helper()
	log, err := os.CreateTemp(e.dir, "serve-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(kilnBin, "serve", "--config", e.config, "--log-level", "info")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &serving{cmd: cmd, log: log.Name(), done: make(chan error, 1)}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() { s.stop(t, syscall.SIGTERM) })
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(s.output(), "kiln serving") {
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("kiln serve exited: %v\n%s", err, s.output())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("kiln serve did not come up\n%s", s.output())
		}
	}
	return s
}

func (s *serving) output() string {
	b, _ := os.ReadFile(s.log)
	return string(b)
}

// stop signals kiln serve and waits for it to exit.
func (s *serving) stop(t *testing.T, sig syscall.Signal) error {
	t.Helper()
	s.cmd.Process.Signal(sig) //nolint:errcheck // it may be gone
	select {
	case err := <-s.done:
		s.done <- err
		return err
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill() //nolint:errcheck // best effort
		t.Errorf("kiln serve did not stop after %v\n%s", sig, s.output())
		return <-s.done
	}
}

// serveFails runs kiln serve, which must exit with an error well before
// the timeout, and returns what it printed.
func serveFails(t *testing.T, e serveEnv) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, kilnBin, "serve", "--config", e.config)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("kiln serve did not give up within 30s\n%s", out)
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("kiln serve: %v, want it to fail\n%s", err, out)
	}
	return string(out)
}

func assertContains(t *testing.T, what, got, want string) {
	t.Helper()
	if !strings.Contains(got, want) {
		t.Errorf("%s:\n%s\nwant it to contain %q", what, got, want)
	}
}

func socketStat(t *testing.T, path string) (os.FileMode, *syscall.Stat_t) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("%s is not a socket: %v", path, fi.Mode())
	}
	return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t)
}

func TestServeSocketPermissions(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		e := newServeEnv(t, "")
		s := startServe(t, e)
		if perm, _ := socketStat(t, e.socket); perm != 0o660 {
			t.Errorf("socket mode %04o, want 0660", perm)
		}
		if err := s.stop(t, syscall.SIGTERM); err != nil {
			t.Errorf("kiln serve on SIGTERM: %v\n%s", err, s.output())
		}
		if _, err := os.Lstat(e.socket); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the socket outlives kiln serve: %v", err)
		}
	})
	t.Run("configured", func(t *testing.T) {
		needRoot(t, "giving the socket another group")
		e := newServeEnv(t, "socket_mode = \"0640\"\nsocket_group = \"4242\"\n")
		startServe(t, e)
		if perm, st := socketStat(t, e.socket); perm != 0o640 || st.Gid != 4242 {
			t.Errorf("socket mode %04o, gid %d; want 0640, gid 4242", perm, st.Gid)
		}
	})
}

func TestServeRefusesUnsafeDirectories(t *testing.T) {
	needRoot(t, "giving the root to another user")
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, e serveEnv)
		want  func(e serveEnv) string
	}{{
		name:  "world-writable root",
		setup: func(t *testing.T, e serveEnv) { mkdirMode(t, e.root, 0o777) },
		want:  func(e serveEnv) string { return fmt.Sprintf("root %s is world-writable (mode 0777)", e.root) },
	}, {
		name: "root of another user",
		setup: func(t *testing.T, e serveEnv) {
			mkdirMode(t, e.root, 0o700)
			if err := os.Chown(e.root, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		},
		want: func(e serveEnv) string {
			return fmt.Sprintf("root %s is owned by uid 65534, not by the user kiln runs as (uid 0)", e.root)
		},
	}, {
		name:  "world-writable socket directory",
		setup: func(t *testing.T, e serveEnv) { mkdirMode(t, filepath.Dir(e.socket), 0o1777) },
		want: func(e serveEnv) string {
			return fmt.Sprintf("socket directory %s is world-writable (mode 1777)", filepath.Dir(e.socket))
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newServeEnv(t, "")
			tc.setup(t, e)
			out := serveFails(t, e)
			assertContains(t, "kiln serve", out, tc.want(e))
			// Refused before kiln touched its state or made its socket.
			if _, err := os.Stat(filepath.Join(e.root, "metadata.db")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("kiln opened its state in a root it refused: %v", err)
			}
			if _, err := os.Lstat(e.socket); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("kiln made its socket: %v", err)
			}
		})
	}
}

func mkdirMode(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// os.Chmod takes Go's sticky bit, not the octal one.
	if err := syscall.Chmod(dir, uint32(mode)); err != nil {
		t.Fatal(err)
	}
}

func TestServeOnePerRoot(t *testing.T) {
	first := newServeEnv(t, "")
	s := startServe(t, first)
	pid := s.cmd.Process.Pid

	// The same root behind another socket: refused, naming the first.
	second := first
	second.socket = filepath.Join(first.dir, "run2", "k.sock")
	second.config = filepath.Join(first.dir, "second.toml")
	second.writeConfig(t, "")
	out := serveFails(t, second)
	assertContains(t, "a second kiln serve on the same root", out,
		fmt.Sprintf("root %s is in use by another kiln serve (pid %d, holding %s)", first.root, pid, filepath.Join(first.root, "serve.lock")))

	// Another root behind the same socket: refused, naming the process
	// that answers on it.
	third := first
	third.root = filepath.Join(first.dir, "root3")
	third.config = filepath.Join(first.dir, "third.toml")
	third.writeConfig(t, "")
	out = serveFails(t, third)
	assertContains(t, "a second kiln serve on the same socket", out,
		fmt.Sprintf("socket %s is in use by another process (pid %d)", first.socket, pid))

	// The first still serves, on its socket.
	c, err := net.DialTimeout("unix", first.socket, time.Second)
	if err != nil {
		t.Fatalf("the first kiln serve no longer answers: %v\n%s", err, s.output())
	}
	c.Close()
}

func TestServeRestartAfterKill(t *testing.T) {
	e := newServeEnv(t, "")
	s := startServe(t, e)
	s.stop(t, syscall.SIGKILL) //nolint:errcheck // killed
	// What the killed kiln left: its lock file and a socket nothing
	// answers on.
	lock := filepath.Join(e.root, "serve.lock")
	if b, err := os.ReadFile(lock); err != nil || strings.TrimSpace(string(b)) != fmt.Sprint(s.cmd.Process.Pid) {
		t.Errorf("lock file: %q, %v; want the killed kiln's pid %d", b, err, s.cmd.Process.Pid)
	}
	socketStat(t, e.socket)

	again := startServe(t, e)
	if b, err := os.ReadFile(lock); err != nil || strings.TrimSpace(string(b)) != fmt.Sprint(again.cmd.Process.Pid) {
		t.Errorf("lock file: %q, %v; want the new kiln's pid %d", b, err, again.cmd.Process.Pid)
	}
	if perm, _ := socketStat(t, e.socket); perm != 0o660 {
		t.Errorf("socket mode %04o after a restart, want 0660", perm)
	}
}
