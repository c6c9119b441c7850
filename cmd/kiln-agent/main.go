// Command kiln-agent is the guest agent of kiln microVMs, installed as
// /.kiln/agent. The host uses it to learn that the guest is up, to run
// commands and to shut the guest down; see package agent for the protocol.
//
// It listens on the transport given by a flag, or else by kiln.agent= on the
// kernel command line (kiln.agent=vsock:1024, kiln.agent=serial:/dev/ttyS1),
// or else on vsock port 1024.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/agent"
	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	vsockPort := flag.Uint("vsock-port", 0, "listen on this vsock port")
	serial := flag.String("serial", "", "serve the serial device at this path, e.g. /dev/ttyS1 or /dev/hvc0")
	unixPath := flag.String("unix", "", "listen on a unix socket at this path")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "kiln-agent: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if *showVersion {
		fmt.Println(buildVersion())
		return
	}

	transport, err := chooseTransport(*vsockPort, *serial, *unixPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiln-agent: %v\n", err)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer stop()
	server := &agent.Server{
		Version: buildVersion(),
		Logf: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "kiln-agent: "+format+"\n", args...)
		},
	}
	if err := server.ListenAndServe(ctx, transport); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "kiln-agent: %s: %v\n", transport, err)
		os.Exit(1)
	}
}

// chooseTransport picks the transport from the flags, of which at most one
// may be given, or from the kernel command line.
func chooseTransport(vsockPort uint, serial, unixPath string) (agent.Transport, error) {
	var chosen []agent.Transport
	if vsockPort != 0 {
		if vsockPort > 1<<32-1 {
			return agent.Transport{}, fmt.Errorf("--vsock-port %d is out of range", vsockPort)
		}
		chosen = append(chosen, agent.Transport{Kind: agent.KindVsock, Port: uint32(vsockPort)})
	}
	if serial != "" {
		chosen = append(chosen, agent.Transport{Kind: agent.KindSerial, Path: serial})
	}
	if unixPath != "" {
		chosen = append(chosen, agent.Transport{Kind: agent.KindUnix, Path: unixPath})
	}
	switch len(chosen) {
	case 1:
		return chosen[0], nil
	case 0:
		c, err := cmdline.Read()
		if err != nil {
			return agent.DefaultTransport, nil
		}
		return agent.TransportFromCmdline(c)
	}
	return agent.Transport{}, errors.New("give only one of --vsock-port, --serial and --unix")
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
		return info.Main.Version
	}
	return "unknown"
}
