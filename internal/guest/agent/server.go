package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/pty"
)

// Server answers agent requests. The zero value is usable, but production
// servers set Version, and tests set Shutdown.
type Server struct {
	// Version is reported by ping.
	Version string
	// MaxOutput caps each of an exec's stdout and stderr; 0 means
	// DefaultMaxOutput.
	MaxOutput int
	// Shutdown stops the guest once a shutdown request has been
	// acknowledged; nil means RequestShutdown.
	Shutdown func(ShutdownAction) error
	// Logf reports problems; nil discards them.
	Logf func(format string, args ...any)
}

func (s *Server) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

// shutdownDelay lets the acknowledgement reach the host, through a slow
// serial line too, before the guest goes away.
const shutdownDelay = 500 * time.Millisecond

// ServeConn handles requests from rw until it reaches end of input or
// fails, or ctx is done and rw is closed by the caller.
func (s *Server) ServeConn(ctx context.Context, rw io.ReadWriter) error {
	lines := newLineReader(rw, MaxLineSize)
	for {
		line, tooLong, err := lines.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if tooLong {
			if err := writeResponse(rw, &Response{Error: fmt.Sprintf("request longer than %d bytes", MaxLineSize)}); err != nil {
				return err
			}
			continue
		}
		if len(line) == 0 || line[0] != '{' {
			continue // blank line or line noise
		}
		resp, after := s.handle(ctx, line)
		if err := writeResponse(rw, resp); err != nil {
			return err
		}
		if after != nil {
			after()
		}
	}
}

// handle answers one request line. The returned function, if any, runs once
// the response is written.
func (s *Server) handle(ctx context.Context, line []byte) (*Response, func()) {
	var req Request
	if err := json.Unmarshal(line, &req); err != nil {
		return &Response{Error: "malformed request: " + err.Error()}, nil
	}
	resp := &Response{ID: req.ID}
	if req.V != ProtocolVersion {
		resp.Error = fmt.Sprintf("unsupported protocol version %d; this agent speaks version %d", req.V, ProtocolVersion)
		return resp, nil
	}
	switch req.Op {
	case OpPing:
		resp.Ping = s.ping()
	case OpExec:
		if req.Exec == nil {
			resp.Error = `exec request without "exec" parameters`
			break
		}
		result, err := s.exec(ctx, req.Exec)
		if err != nil {
			resp.Error = err.Error()
			break
		}
		resp.Exec = result
	case OpShutdown:
		action := PowerOff
		if req.Shutdown != nil && req.Shutdown.Action != "" {
			action = req.Shutdown.Action
		}
		if action != PowerOff && action != Reboot {
			resp.Error = fmt.Sprintf("unknown shutdown action %q; want %q or %q", action, PowerOff, Reboot)
			break
		}
		return resp, func() { go s.shutdown(action) }
	default:
		resp.Error = fmt.Sprintf("unknown op %q; want %q, %q or %q", req.Op, OpPing, OpExec, OpShutdown)
	}
	return resp, nil
}

func (s *Server) ping() *PingResult {
	host, _ := os.Hostname()
	return &PingResult{Ready: true, Version: s.Version, Hostname: host, UptimeSeconds: uptime()}
}

// uptime reads the seconds since boot from /proc/uptime.
func uptime() float64 {
	data, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	first, _, _ := strings.Cut(string(data), " ")
	secs, _ := strconv.ParseFloat(first, 64)
	return secs
}

func (s *Server) shutdown(action ShutdownAction) {
	time.Sleep(shutdownDelay)
	stop := s.Shutdown
	if stop == nil {
		stop = func(a ShutdownAction) error { return RequestShutdown(a, s.logf) }
	}
	if err := stop(action); err != nil {
		s.logf("%s: %v", action, err)
	}
}

func writeResponse(w io.Writer, resp *Response) error {
	resp.V = ProtocolVersion
	data, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encode response: %w", err)
	}
	if _, err := w.Write(append(data, '\n')); err != nil {
		return fmt.Errorf("write response: %w", err)
	}
	return nil
}

// Serve accepts connections on l and serves each in its own goroutine until
// ctx is done, then closes l.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer conn.Close()
			stopConn := context.AfterFunc(ctx, func() { conn.Close() })
			defer stopConn()
			if err := s.ServeConn(ctx, conn); err != nil && ctx.Err() == nil {
				s.logf("connection from %s: %v", conn.RemoteAddr(), err)
			}
		}()
	}
}

// serialRetry is the pause before reopening a serial device that failed.
const serialRetry = time.Second

// ServeSerial serves the serial device at path (/dev/ttyS1, /dev/hvc0, ...)
// in raw mode until ctx is done. A serial line has a single peer, so
// requests are handled one at a time. The device is reopened whenever it
// fails, e.g. when the other end hangs up.
func (s *Server) ServeSerial(ctx context.Context, path string) error {
	logged := false
	for ctx.Err() == nil {
		err := s.serveSerialOnce(ctx, path)
		if ctx.Err() != nil {
			break
		}
		if err != nil && !logged {
			s.logf("serial %s: %v; retrying", path, err)
			logged = true
		}
		select {
		case <-ctx.Done():
		case <-time.After(serialRetry):
		}
	}
	return nil
}

func (s *Server) serveSerialOnce(ctx context.Context, path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	if err := pty.MakeRaw(f); err != nil {
		return err
	}
	// The kernel's default of 9600 baud would make an emulated 16550
	// crawl; virtio consoles ignore the speed.
	_ = pty.SetSpeed(f, unix.B115200)
	// Drop whatever arrived before we listened: partial requests from a
	// host that was already polling.
	_ = pty.FlushInput(f)
	return s.ServeConn(ctx, f)
}

// cappedBuffer keeps the first max bytes written to it.
type cappedBuffer struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - b.buf.Len(); len(p) > room {
		b.truncated = true
		p = p[:max(room, 0)]
	}
	b.buf.Write(p)
	return n, nil
}

// bytes returns what was kept, never nil, so that JSON carries "" rather
// than null for an empty stream.
func (b *cappedBuffer) bytes() []byte {
	if b.buf.Len() == 0 {
		return []byte{}
	}
	return b.buf.Bytes()
}
