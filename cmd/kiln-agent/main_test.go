package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/guest/agent"
)

func TestChooseTransport(t *testing.T) {
	for _, tc := range []struct {
		port         uint
		serial, unix string
		want         agent.Transport
	}{
		{port: 2048, want: agent.Transport{Kind: agent.KindVsock, Port: 2048}},
		{serial: "/dev/ttyS1", want: agent.Transport{Kind: agent.KindSerial, Path: "/dev/ttyS1"}},
		{unix: "/run/a.sock", want: agent.Transport{Kind: agent.KindUnix, Path: "/run/a.sock"}},
	} {
		got, err := chooseTransport(tc.port, tc.serial, tc.unix)
		if err != nil || got != tc.want {
			t.Errorf("chooseTransport(%d, %q, %q) = %+v, %v; want %+v", tc.port, tc.serial, tc.unix, got, err, tc.want)
		}
	}
	if _, err := chooseTransport(1024, "/dev/ttyS1", ""); err == nil {
		t.Error("two transports accepted")
	}
}

// TestAgentBinary builds kiln-agent and drives it over a unix socket.
func TestAgentBinary(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: the go tool is needed to build kiln-agent")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "kiln-agent")
	build := exec.Command(goTool, "build", "-ldflags", "-X main.version=v9.8.7", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}

	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(bin, "--unix", sock)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var c *agent.Client
	for c == nil {
		c, err = agent.DialUnix(ctx, sock)
		if ctx.Err() != nil {
			t.Fatalf("agent never listened: %v; stderr: %s", err, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	ping, err := c.Ping(ctx)
	if err != nil || ping.Version != "v9.8.7" {
		t.Fatalf("ping = %+v, %v", ping, err)
	}
	res, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"echo", "hi"}})
	if err != nil || string(res.Stdout) != "hi\n" {
		t.Fatalf("exec = %+v, %v", res, err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("kiln-agent after SIGTERM: %v; stderr: %s", err, stderr.String())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}
