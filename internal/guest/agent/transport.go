package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

// DefaultVsockPort is the vsock port the agent listens on by default.
const DefaultVsockPort = 1024

// Transport kinds.
const (
	KindVsock  = "vsock"
	KindSerial = "serial"
	KindUnix   = "unix"
)

// Transport says how the agent is reached.
type Transport struct {
	// Kind is KindVsock, KindSerial or KindUnix.
	Kind string
	// Port is the vsock port.
	Port uint32
	// Path is the serial device or the unix socket.
	Path string
}

// DefaultTransport is vsock on DefaultVsockPort.
var DefaultTransport = Transport{Kind: KindVsock, Port: DefaultVsockPort}

func (t Transport) String() string {
	if t.Kind == KindVsock {
		return fmt.Sprintf("%s:%d", t.Kind, t.Port)
	}
	return t.Kind + ":" + t.Path
}

// ParseTransport parses "vsock:PORT", "vsock" (the default port),
// "serial:DEVICE" or "unix:PATH", the syntax of kiln.agent= on the kernel
// command line.
func ParseTransport(s string) (Transport, error) {
	kind, arg, _ := strings.Cut(s, ":")
	switch kind {
	case KindVsock:
		if arg == "" {
			return DefaultTransport, nil
		}
		port, err := strconv.ParseUint(arg, 10, 32)
		if err != nil {
			return Transport{}, fmt.Errorf("agent transport %q: vsock port %q is not a number", s, arg)
		}
		return Transport{Kind: KindVsock, Port: uint32(port)}, nil
	case KindSerial, KindUnix:
		if arg == "" {
			return Transport{}, fmt.Errorf("agent transport %q: missing path after %q", s, kind+":")
		}
		return Transport{Kind: kind, Path: arg}, nil
	}
	return Transport{}, fmt.Errorf("agent transport %q: want vsock:PORT, serial:DEVICE or unix:PATH", s)
}

// TransportFromCmdline returns the transport named by kiln.agent= on the
// kernel command line, or DefaultTransport.
func TransportFromCmdline(c cmdline.Cmdline) (Transport, error) {
	v, ok := c.Lookup(guest.ParamAgent)
	if !ok || v == "" {
		return DefaultTransport, nil
	}
	return ParseTransport(v)
}

// listenRetry is the pause between attempts to listen on vsock, whose
// transport module may still be loading.
const listenRetry = time.Second

// ListenAndServe serves requests on t until ctx is done.
func (s *Server) ListenAndServe(ctx context.Context, t Transport) error {
	switch t.Kind {
	case KindSerial:
		return s.ServeSerial(ctx, t.Path)
	case KindUnix:
		l, err := listenUnix(t.Path)
		if err != nil {
			return err
		}
		defer os.Remove(t.Path)
		return s.Serve(ctx, l)
	case KindVsock:
		l, err := s.listenVsock(ctx, t.Port)
		if err != nil {
			return err
		}
		return s.Serve(ctx, l)
	}
	return fmt.Errorf("unknown agent transport %q", t.Kind)
}

// listenVsock listens on any local context ID, retrying until the vsock
// transport is available or ctx is done.
func (s *Server) listenVsock(ctx context.Context, port uint32) (net.Listener, error) {
	logged := false
	for {
		l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
		if err == nil {
			return l, nil
		}
		if !logged {
			s.logf("listen on vsock port %d: %v; retrying (is vmw_vsock_virtio_transport loaded?)", port, err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(listenRetry):
		}
	}
}

func listenUnix(path string) (net.Listener, error) {
	// A socket left by an earlier run would make bind fail.
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSocket != 0 {
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict %s: %w", path, err)
	}
	return l, nil
}

// ErrHandshake reports a hybrid vsock proxy that refused the connection.
var ErrHandshake = errors.New("vsock proxy handshake failed")
