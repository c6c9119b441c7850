package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/guest/pty"
)

// TestSerial runs the agent on the terminal side of a pseudo-terminal, as it
// would on /dev/ttyS1, and the client on the controller side, as the host
// would on the VMM's end of the serial port. The host starts polling before
// the agent is up while the "guest" prints boot messages on the line.
func TestSerial(t *testing.T) {
	controller, terminal, err := pty.Open()
	if err != nil {
		t.Skipf("skipping: no pseudo-terminals: %v", err)
	}
	// The terminal stays open for the whole test, like a serial port
	// that always exists; the agent opens it again by path.
	defer terminal.Close()
	c := NewClient(controller)
	defer c.Close()

	srv, rec := newTestServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	defer func() {
		cancel()
		select {
		case <-served:
		case <-time.After(5 * time.Second):
			t.Error("ServeSerial did not return after cancellation")
		}
	}()

	ready := make(chan error, 1)
	go func() {
		waitCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		_, err := c.WaitReady(waitCtx, 200*time.Millisecond)
		ready <- err
	}()

	// Boot noise from the guest while the host already polls.
	time.Sleep(300 * time.Millisecond)
	terminal.Write([]byte("SeaBIOS (version 1.16)\r\n\x1b[2J[    0.000000] Linux version 6.1\n{partial json"))
	time.Sleep(300 * time.Millisecond)
	go func() { served <- srv.ServeSerial(ctx, terminal.Name()) }()

	if err := <-ready; err != nil {
		t.Fatalf("WaitReady over serial: %v", err)
	}

	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	defer rcancel()
	stdin := strings.Repeat("binary\x00\xff\r\n\x03\x04 ", 2000) // control characters must pass raw
	res, err := c.Exec(rctx, ExecRequest{Argv: []string{"cat"}, Stdin: []byte(stdin)})
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Stdout) != stdin {
		t.Errorf("stdout differs from stdin over serial (%d vs %d bytes)", len(res.Stdout), len(stdin))
	}
	if err := c.Shutdown(rctx, Reboot); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rec.called:
	case <-time.After(5 * time.Second):
		t.Fatal("shutdown not carried out")
	}
}

func TestServeSerialMissingDevice(t *testing.T) {
	srv, _ := newTestServer(t)
	var logged []string
	srv.Logf = func(f string, a ...any) { logged = append(logged, f) }
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := srv.ServeSerial(ctx, "/dev/kiln-no-such-tty"); err != nil {
		t.Errorf("ServeSerial = %v, want nil after cancellation", err)
	}
	if len(logged) != 1 {
		t.Errorf("logged %d times, want the failure reported once", len(logged))
	}
}
