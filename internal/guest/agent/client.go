package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// RemoteError is a request the agent received and refused or failed.
type RemoteError struct {
	Op      Op
	Message string
}

func (e *RemoteError) Error() string { return fmt.Sprintf("agent %s: %s", e.Op, e.Message) }

// Client talks to an agent over any byte stream. Requests are sent one at a
// time. Lines that are not responses to the current request are skipped:
// over a serial line the host also sees firmware and kernel output, echoes,
// and late answers to requests it gave up on.
type Client struct {
	w      io.Writer
	closer io.Closer

	mu     sync.Mutex // serialises requests
	nextID uint64

	responses chan *Response
	done      chan struct{} // closed when reading fails
	readErr   error
}

// NewClient starts a client on rw. Close closes rw if it is an io.Closer.
func NewClient(rw io.ReadWriter) *Client {
	c := &Client{
		w:         rw,
		responses: make(chan *Response),
		done:      make(chan struct{}),
	}
	if closer, ok := rw.(io.Closer); ok {
		c.closer = closer
	}
	go c.readLoop(rw)
	return c
}

// Close closes the underlying connection.
func (c *Client) Close() error {
	if c.closer == nil {
		return nil
	}
	return c.closer.Close()
}

func (c *Client) readLoop(r io.Reader) {
	lines := newLineReader(r, MaxLineSize)
	for {
		line, tooLong, err := lines.next()
		if err != nil {
			c.readErr = err
			close(c.done)
			return
		}
		if tooLong {
			continue
		}
		if resp := parseResponse(line); resp != nil {
			select {
			case c.responses <- resp:
			case <-time.After(time.Minute):
				// Nobody is waiting for it: a late answer.
			}
		}
	}
}

// parseResponse extracts a response from a line that may carry other output
// before it, as a serial console does. It returns nil for anything else,
// including echoed requests.
func parseResponse(line []byte) *Response {
	i := bytes.Index(line, []byte(`{"v":`))
	if i < 0 {
		return nil
	}
	var msg struct {
		Response
		Op Op `json:"op"`
	}
	// A decoder stops after the first value, ignoring whatever follows.
	if err := json.NewDecoder(bytes.NewReader(line[i:])).Decode(&msg); err != nil {
		return nil
	}
	if msg.Op != "" || msg.ID == 0 {
		return nil
	}
	return &msg.Response
}

// roundTrip sends req and waits for the response with its ID.
func (c *Client) roundTrip(ctx context.Context, req *Request) (*Response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	req.V = ProtocolVersion
	req.ID = c.nextID
	data, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode %s request: %w", req.Op, err)
	}
	if err := c.write(ctx, append(data, '\n')); err != nil {
		return nil, fmt.Errorf("send %s request: %w", req.Op, err)
	}
	for {
		select {
		case resp := <-c.responses:
			if resp.ID != req.ID {
				continue // a late answer to an abandoned request
			}
			if resp.V != ProtocolVersion {
				return nil, fmt.Errorf("agent answered with protocol version %d, want %d", resp.V, ProtocolVersion)
			}
			if resp.Error != "" {
				return nil, &RemoteError{Op: req.Op, Message: resp.Error}
			}
			return resp, nil
		case <-c.done:
			return nil, fmt.Errorf("agent connection: %w", c.connErr())
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (c *Client) connErr() error {
	if errors.Is(c.readErr, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return c.readErr
}

// write sends data, giving up when ctx is done if the connection supports
// write deadlines.
func (c *Client) write(ctx context.Context, data []byte) error {
	type deadliner interface{ SetWriteDeadline(time.Time) error }
	if d, ok := c.w.(deadliner); ok {
		if deadline, ok := ctx.Deadline(); ok {
			if err := d.SetWriteDeadline(deadline); err == nil {
				defer d.SetWriteDeadline(time.Time{})
			}
		}
	}
	_, err := c.w.Write(data)
	return err
}

// Ping asks the agent whether the guest is ready.
func (c *Client) Ping(ctx context.Context) (*PingResult, error) {
	resp, err := c.roundTrip(ctx, &Request{Op: OpPing})
	if err != nil {
		return nil, err
	}
	if resp.Ping == nil {
		return nil, errors.New("agent ping: response has no ping result")
	}
	return resp.Ping, nil
}

// WaitReady pings every interval until the agent answers ready or ctx is
// done. Use it when the guest may still be booting: before the agent runs, a
// serial line carries only boot messages and requests go unanswered.
func (c *Client) WaitReady(ctx context.Context, interval time.Duration) (*PingResult, error) {
	var lastErr error
	for {
		start := time.Now()
		// Terminate any partial line the guest holds from before, so
		// that the ping is read as a line of its own.
		_ = c.write(ctx, []byte("\n"))
		attempt, cancel := context.WithTimeout(ctx, interval)
		ping, err := c.Ping(attempt)
		cancel()
		switch {
		case err == nil && ping.Ready:
			return ping, nil
		case err == nil:
			lastErr = errors.New("agent answered but is not ready")
		case !errors.Is(err, context.DeadlineExceeded):
			lastErr = err
		}
		select {
		case <-c.done:
			return nil, fmt.Errorf("agent connection: %w", c.connErr())
		default:
		}
		if ctx.Err() != nil {
			if lastErr != nil {
				return nil, fmt.Errorf("agent not ready: %w (last error: %v)", ctx.Err(), lastErr)
			}
			return nil, fmt.Errorf("agent not ready: %w", ctx.Err())
		}
		// After a quick failure, wait out the interval rather than spin.
		select {
		case <-ctx.Done():
		case <-time.After(interval - time.Since(start)):
		}
	}
}

// Exec runs a command in the guest. A command that runs and fails is not an
// error: see ExecResult.ExitCode.
func (c *Client) Exec(ctx context.Context, req ExecRequest) (*ExecResult, error) {
	resp, err := c.roundTrip(ctx, &Request{Op: OpExec, Exec: &req})
	if err != nil {
		return nil, err
	}
	if resp.Exec == nil {
		return nil, errors.New("agent exec: response has no exec result")
	}
	return resp.Exec, nil
}

// Shutdown asks the guest to power off or reboot and returns once the agent
// has acknowledged; the guest stops shortly after.
func (c *Client) Shutdown(ctx context.Context, action ShutdownAction) error {
	_, err := c.roundTrip(ctx, &Request{Op: OpShutdown, Shutdown: &ShutdownRequest{Action: action}})
	return err
}

// DialUnix connects to an agent listening on a unix socket.
func DialUnix(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial agent: %w", err)
	}
	return NewClient(conn), nil
}

// DialHybridVsock connects to an agent through the unix socket that
// Firecracker and Cloud Hypervisor expose for a guest's vsock device: the
// host writes "CONNECT <port>" and the VMM answers "OK <host port>".
func DialHybridVsock(ctx context.Context, socketPath string, port uint32) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("dial agent through %s: %w", socketPath, err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	r := bufio.NewReader(conn)
	_, err = fmt.Fprintf(conn, "CONNECT %d\n", port)
	var reply string
	if err == nil {
		reply, err = r.ReadString('\n')
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("dial agent through %s: %w", socketPath, err)
	}
	if !strings.HasPrefix(reply, "OK ") {
		conn.Close()
		return nil, fmt.Errorf("dial agent through %s: %w: %q", socketPath, ErrHandshake, strings.TrimSpace(reply))
	}
	conn.SetDeadline(time.Time{})
	// The reader may already hold bytes past the handshake line.
	return NewClient(struct {
		io.Reader
		io.Writer
		io.Closer
	}{r, conn, conn}), nil
}
