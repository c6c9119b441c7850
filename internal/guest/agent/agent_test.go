package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// shutdownRecorder stands in for powering the machine off.
type shutdownRecorder struct {
	mu      sync.Mutex
	actions []ShutdownAction
	called  chan struct{}
}

func newShutdownRecorder() *shutdownRecorder {
	return &shutdownRecorder{called: make(chan struct{}, 10)}
}

func (r *shutdownRecorder) shutdown(a ShutdownAction) error {
	r.mu.Lock()
	r.actions = append(r.actions, a)
	r.mu.Unlock()
	r.called <- struct{}{}
	return nil
}

func newTestServer(t *testing.T) (*Server, *shutdownRecorder) {
	rec := newShutdownRecorder()
	return &Server{
		Version:  "test-1",
		Shutdown: rec.shutdown,
		Logf:     t.Logf,
	}, rec
}

// serveUnix runs srv on a unix socket until the test ends.
func serveUnix(t *testing.T, srv *Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := listenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path
}

func dialUnix(t *testing.T, path string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := DialUnix(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestUnixPing(t *testing.T) {
	srv, _ := newTestServer(t)
	c := dialUnix(t, serveUnix(t, srv))
	ping, err := c.Ping(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if !ping.Ready || ping.Version != "test-1" || ping.Hostname != host || ping.UptimeSeconds <= 0 {
		t.Errorf("ping = %+v", ping)
	}
}

func TestUnixExec(t *testing.T) {
	srv, _ := newTestServer(t)
	c := dialUnix(t, serveUnix(t, srv))
	ctx := testContext(t)
	dir := t.TempDir()

	res, err := c.Exec(ctx, ExecRequest{
		Argv:  []string{"sh", "-c", `cat; echo "$GREETING from $(pwd)"; echo oops >&2; exit 3`},
		Env:   []string{"GREETING=hello", "PATH=/usr/bin:/bin"},
		Dir:   dir,
		Stdin: []byte("input\x00bytes\n"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "input\x00bytes\nhello from " + dir + "\n"; string(res.Stdout) != want {
		t.Errorf("stdout = %q, want %q", res.Stdout, want)
	}
	if string(res.Stderr) != "oops\n" || res.ExitCode != 3 || res.Signal != "" || res.TimedOut {
		t.Errorf("result = %+v", res)
	}

	// The request's PATH, not the agent's, finds the executable.
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "kiln-test-tool"), []byte("#!/bin/sh\necho tool ran\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	res, err = c.Exec(ctx, ExecRequest{Argv: []string{"kiln-test-tool"}, Env: []string{"PATH=" + bin + ":/bin"}})
	if err != nil || string(res.Stdout) != "tool ran\n" {
		t.Errorf("PATH lookup: %+v, %v", res, err)
	}
}

func TestUnixExecErrors(t *testing.T) {
	srv, _ := newTestServer(t)
	c := dialUnix(t, serveUnix(t, srv))
	ctx := testContext(t)

	_, err := c.Exec(ctx, ExecRequest{Argv: []string{"kiln-no-such-command"}})
	var remote *RemoteError
	if !errors.As(err, &remote) || !strings.Contains(remote.Message, `"kiln-no-such-command" not found`) {
		t.Errorf("missing command: err = %v", err)
	}
	if _, err := c.Exec(ctx, ExecRequest{}); !errors.As(err, &remote) {
		t.Errorf("empty argv: err = %v", err)
	}
	// The connection survives failed requests.
	if _, err := c.Ping(ctx); err != nil {
		t.Errorf("ping after errors: %v", err)
	}
}

func TestUnixExecTimeoutKillsProcessGroup(t *testing.T) {
	srv, _ := newTestServer(t)
	c := dialUnix(t, serveUnix(t, srv))
	start := time.Now()
	// The background sleep holds stdout open; the whole group must die.
	res, err := c.Exec(testContext(t), ExecRequest{
		Argv:      []string{"sh", "-c", "sleep 30 & echo started; sleep 30"},
		TimeoutMS: 300,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.TimedOut || res.ExitCode != -1 || res.Signal != "SIGKILL" || string(res.Stdout) != "started\n" {
		t.Errorf("result = %+v", res)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("exec took %s after a 300ms timeout", d)
	}
}

func TestUnixExecOutputCap(t *testing.T) {
	srv, _ := newTestServer(t)
	srv.MaxOutput = 1000
	c := dialUnix(t, serveUnix(t, srv))
	res, err := c.Exec(testContext(t), ExecRequest{
		Argv: []string{"sh", "-c", "head -c 5000 /dev/zero; head -c 10 /dev/zero >&2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Stdout) != 1000 || !res.StdoutTruncated || len(res.Stderr) != 10 || res.StderrTruncated {
		t.Errorf("stdout %d bytes (truncated %v), stderr %d bytes (truncated %v)",
			len(res.Stdout), res.StdoutTruncated, len(res.Stderr), res.StderrTruncated)
	}
}

func TestUnixShutdown(t *testing.T) {
	for _, action := range []ShutdownAction{PowerOff, Reboot} {
		srv, rec := newTestServer(t)
		c := dialUnix(t, serveUnix(t, srv))
		if err := c.Shutdown(testContext(t), action); err != nil {
			t.Fatal(err)
		}
		select {
		case <-rec.called:
		case <-time.After(5 * time.Second):
			t.Fatal("shutdown was acknowledged but never carried out")
		}
		if len(rec.actions) != 1 || rec.actions[0] != action {
			t.Errorf("actions = %v, want [%s]", rec.actions, action)
		}
	}

	srv, rec := newTestServer(t)
	c := dialUnix(t, serveUnix(t, srv))
	var remote *RemoteError
	if err := c.Shutdown(testContext(t), "halt-and-catch-fire"); !errors.As(err, &remote) {
		t.Errorf("unknown action: err = %v", err)
	}
	select {
	case <-rec.called:
		t.Error("an invalid shutdown request was carried out")
	case <-time.After(shutdownDelay + 200*time.Millisecond):
	}
}

func TestUnixConcurrentClients(t *testing.T) {
	srv, _ := newTestServer(t)
	path := serveUnix(t, srv)
	ctx := testContext(t)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		c := dialUnix(t, path)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 5; j++ {
				res, err := c.Exec(ctx, ExecRequest{Argv: []string{"echo", "x"}})
				if err != nil || string(res.Stdout) != "x\n" {
					t.Errorf("exec: %+v, %v", res, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// TestWireFormat drives the server with raw lines, as another
// implementation of the protocol would.
func TestWireFormat(t *testing.T) {
	srv, _ := newTestServer(t)
	conn, err := net.Dial("unix", serveUnix(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(conn)

	send := func(line string) map[string]any {
		t.Helper()
		if _, err := conn.Write([]byte(line + "\n")); err != nil {
			t.Fatal(err)
		}
		reply, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(reply), &m); err != nil {
			t.Fatalf("response %q is not JSON: %v", reply, err)
		}
		return m
	}

	// Noise and blank lines get no answer: the next answer is the ping's.
	conn.Write([]byte("\n   \r\nBooting the kernel.\n"))
	m := send(`{"v":1,"id":7,"op":"ping"}`)
	if m["v"] != 1.0 || m["id"] != 7.0 || m["ping"].(map[string]any)["ready"] != true {
		t.Errorf("ping response = %v", m)
	}

	m = send(`{"v":1,"id":8,"op":"exec","exec":{"argv":["cat"],"stdin":"aGk="}}`)
	exec := m["exec"].(map[string]any)
	if m["id"] != 8.0 || exec["stdout"] != "aGk=" || exec["stderr"] != "" || exec["exit_code"] != 0.0 {
		t.Errorf("exec response = %v", m)
	}

	for _, tc := range []struct{ line, want string }{
		{`{"v":2,"id":9,"op":"ping"}`, "unsupported protocol version 2"},
		{`{"v":1,"id":10,"op":"dance"}`, `unknown op "dance"`},
		{`{"v":1,"id":11,"op":"exec"}`, `without "exec" parameters`},
		{`{"v":1,"id":12,`, "malformed request"},
	} {
		m := send(tc.line)
		if msg, _ := m["error"].(string); !strings.Contains(msg, tc.want) {
			t.Errorf("%s: error = %q, want it to mention %q", tc.line, msg, tc.want)
		}
	}
}

// TestClientSkipsForeignLines feeds the client what a serial console may
// carry between the request and its answer.
func TestClientSkipsForeignLines(t *testing.T) {
	host, guest := net.Pipe()
	defer guest.Close()
	c := NewClient(host)
	defer c.Close()

	go func() {
		r := bufio.NewReader(guest)
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		var req Request
		json.Unmarshal([]byte(line), &req)
		guest.Write([]byte(
			"[    0.412] virtio_net virtio1 eth0: renamed\r\n" +
				line + // an echo of the request itself
				`{"v":1,"id":999,"ping":{"ready":true,"version":"stale"}}` + "\n" +
				"\x00\xff binary junk {\n" +
				`[    0.5] kernel says {"v":1,"id":` + jsonNumber(req.ID) +
				`,"ping":{"ready":true,"version":"right"}} trailing` + "\r\n"))
	}()
	ping, err := c.Ping(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	if ping.Version != "right" {
		t.Errorf("got the wrong response: %+v", ping)
	}
}

func jsonNumber(n uint64) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestClientReportsClosedConnection(t *testing.T) {
	host, guest := net.Pipe()
	c := NewClient(host)
	go func() {
		bufio.NewReader(guest).ReadString('\n')
		guest.Close()
	}()
	_, err := c.Ping(testContext(t))
	if err == nil || !strings.Contains(err.Error(), "agent connection") {
		t.Errorf("err = %v, want a connection error", err)
	}
}

func TestDialHybridVsock(t *testing.T) {
	srv, _ := newTestServer(t)
	sock := filepath.Join(t.TempDir(), "v.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// A stand-in for Firecracker's vsock proxy in front of the agent.
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				r := bufio.NewReader(conn)
				line, _ := r.ReadString('\n')
				if line != "CONNECT 1024\n" {
					conn.Write([]byte("ERR unknown port\n"))
					return
				}
				conn.Write([]byte("OK 1073741824\n"))
				srv.ServeConn(context.Background(), struct {
					io.Reader
					io.Writer
				}{r, conn})
			}()
		}
	}()

	ctx := testContext(t)
	c, err := DialHybridVsock(ctx, sock, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := DialHybridVsock(ctx, sock, 5); !errors.Is(err, ErrHandshake) {
		t.Errorf("refused port: err = %v", err)
	}
}
