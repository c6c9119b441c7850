package agent

import (
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

func TestParseTransport(t *testing.T) {
	for in, want := range map[string]Transport{
		"vsock":             {Kind: KindVsock, Port: 1024},
		"vsock:52":          {Kind: KindVsock, Port: 52},
		"serial:/dev/ttyS1": {Kind: KindSerial, Path: "/dev/ttyS1"},
		"unix:/run/a.sock":  {Kind: KindUnix, Path: "/run/a.sock"},
	} {
		got, err := ParseTransport(in)
		if err != nil || got != want {
			t.Errorf("ParseTransport(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if round, _ := ParseTransport(got.String()); round != got {
			t.Errorf("%+v does not survive String: %q", got, got.String())
		}
	}
	for _, in := range []string{"", "tcp:80", "vsock:x", "vsock:99999999999", "serial:", "unix"} {
		if _, err := ParseTransport(in); err == nil {
			t.Errorf("ParseTransport(%q) succeeded", in)
		}
	}
}

func TestTransportFromCmdline(t *testing.T) {
	got, err := TransportFromCmdline(cmdline.Parse("console=ttyS0 kiln.agent=serial:/dev/hvc0"))
	if err != nil || got != (Transport{Kind: KindSerial, Path: "/dev/hvc0"}) {
		t.Errorf("got %+v, %v", got, err)
	}
	got, err = TransportFromCmdline(cmdline.Parse("console=ttyS0"))
	if err != nil || got != DefaultTransport {
		t.Errorf("default: got %+v, %v", got, err)
	}
	if _, err := TransportFromCmdline(cmdline.Parse("kiln.agent=carrier-pigeon")); err == nil ||
		!strings.Contains(err.Error(), "carrier-pigeon") {
		t.Errorf("bad transport: err = %v", err)
	}
}

func TestLineReader(t *testing.T) {
	in := "short\r\n" + strings.Repeat("x", 100) + "\nafter\nlast"
	lr := newLineReader(strings.NewReader(in), 16)
	type got struct {
		line    string
		tooLong bool
	}
	var lines []got
	for {
		line, tooLong, err := lr.next()
		if err != nil {
			break
		}
		lines = append(lines, got{string(line), tooLong})
	}
	want := []got{{"short", false}, {"", true}, {"after", false}, {"last", false}}
	if len(lines) != len(want) {
		t.Fatalf("lines = %+v, want %+v", lines, want)
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d = %+v, want %+v", i, lines[i], want[i])
		}
	}
}

func TestLineReaderLongLines(t *testing.T) {
	// Longer than the 64 KiB read buffer, so lines arrive in pieces.
	long := strings.Repeat("a", 100<<10)
	tooLong := strings.Repeat("b", 200<<10)
	lr := newLineReader(strings.NewReader(long+"\n"+tooLong+"\nok\n"), 150<<10)
	line, over, err := lr.next()
	if err != nil || over || string(line) != long {
		t.Fatalf("long line: %d bytes, tooLong %v, %v", len(line), over, err)
	}
	if _, over, err = lr.next(); err != nil || !over {
		t.Fatalf("too long line: tooLong %v, %v", over, err)
	}
	if line, over, err = lr.next(); err != nil || over || string(line) != "ok" {
		t.Fatalf("line after: %q %v %v", line, over, err)
	}
}
