// Package agent implements kiln-agent, the guest agent of kiln microVMs, and
// the host-side client that talks to it.
//
// # Protocol
//
// The protocol is newline-delimited JSON over any byte stream: vsock, a
// serial line or a unix socket. The host sends one request per line and the
// agent answers each with one response line carrying the same "id".
// Requests on one connection are handled in order. Every message has
// "v": 1, the protocol version; the agent rejects other versions. Byte
// fields (stdin, stdout, stderr) are base64, as encoding/json encodes
// []byte. Blank lines and lines not starting with "{" are ignored, so
// line noise on a serial port does no harm.
//
//	→ {"v":1,"id":1,"op":"ping"}
//	← {"v":1,"id":1,"ping":{"ready":true,"version":"v0.1.0","hostname":"web","uptime_seconds":1.52}}
//	→ {"v":1,"id":2,"op":"exec","exec":{"argv":["cat"],"stdin":"aGk=","timeout_ms":5000}}
//	← {"v":1,"id":2,"exec":{"exit_code":0,"stdout":"aGk=","stderr":""}}
//	→ {"v":1,"id":3,"op":"exec","exec":{"argv":["nope"]}}
//	← {"v":1,"id":3,"error":"exec: executable \"nope\" not found in PATH \"/usr/bin:/bin\""}
//	→ {"v":1,"id":4,"op":"shutdown","shutdown":{"action":"poweroff"}}
//	← {"v":1,"id":4}
//
// After acknowledging a shutdown the agent asks the guest's init to power
// off or reboot (kiln-init and systemd stop their services first) and falls
// back to doing it directly.
package agent

// ProtocolVersion is the version of the wire protocol, carried in "v".
const ProtocolVersion = 1

// Op names a request.
type Op string

const (
	OpPing     Op = "ping"
	OpExec     Op = "exec"
	OpShutdown Op = "shutdown"
)

// Request is one line from the host.
type Request struct {
	V        int              `json:"v"`
	ID       uint64           `json:"id"`
	Op       Op               `json:"op"`
	Exec     *ExecRequest     `json:"exec,omitempty"`
	Shutdown *ShutdownRequest `json:"shutdown,omitempty"`
}

// Response is the agent's answer to the request with the same ID. Error is
// set when the request failed; otherwise the result for its Op is.
type Response struct {
	V     int         `json:"v"`
	ID    uint64      `json:"id"`
	Error string      `json:"error,omitempty"`
	Ping  *PingResult `json:"ping,omitempty"`
	Exec  *ExecResult `json:"exec,omitempty"`
}

// PingResult tells the host the guest is up.
type PingResult struct {
	Ready         bool    `json:"ready"`
	Version       string  `json:"version"`
	Hostname      string  `json:"hostname"`
	UptimeSeconds float64 `json:"uptime_seconds"`
}

// ExecRequest runs a command in the guest and collects its output.
type ExecRequest struct {
	// Argv is the command; Argv[0] is looked up in PATH unless it holds a
	// slash.
	Argv []string `json:"argv"`
	// Env entries (KEY=VALUE) are added to, and override, the agent's
	// environment.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory; "/" when empty.
	Dir string `json:"dir,omitempty"`
	// Stdin is fed to the command, which otherwise reads end-of-file.
	Stdin []byte `json:"stdin,omitempty"`
	// TimeoutMS, when positive, kills the command (and its process
	// group) after that many milliseconds.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
}

// ExecResult is the outcome of an ExecRequest.
type ExecResult struct {
	// ExitCode is the exit status, or -1 when a signal killed the command.
	ExitCode int `json:"exit_code"`
	// Signal names the signal that killed the command, e.g. "SIGKILL".
	Signal string `json:"signal,omitempty"`
	// TimedOut is set when the command was killed for exceeding its
	// timeout.
	TimedOut bool   `json:"timed_out,omitempty"`
	Stdout   []byte `json:"stdout"`
	Stderr   []byte `json:"stderr"`
	// The outputs are capped (DefaultMaxOutput each); these say whether
	// anything was dropped.
	StdoutTruncated bool `json:"stdout_truncated,omitempty"`
	StderrTruncated bool `json:"stderr_truncated,omitempty"`
}

// ShutdownAction says how to stop the guest.
type ShutdownAction string

const (
	PowerOff ShutdownAction = "poweroff"
	Reboot   ShutdownAction = "reboot"
)

// ShutdownRequest stops the guest once acknowledged.
type ShutdownRequest struct {
	Action ShutdownAction `json:"action"`
}

// Size limits of the protocol.
const (
	// MaxLineSize bounds one request or response line, and so the stdin
	// of an exec request.
	MaxLineSize = 32 << 20
	// DefaultMaxOutput caps each of stdout and stderr of an exec.
	DefaultMaxOutput = 4 << 20
)
