package main

import (
	"fmt"
	"net"
	"os"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/config"
	"github.com/kilnfs/kiln/plugin/service"
)

func newServeCommand() *cobra.Command {
	var (
		configPath string
		root       string
		address    string
		containerd string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve containerd as a proxy snapshotter and differ",
		Long: `Serve containerd's Snapshots and Diff APIs on a unix socket.

containerd pulls with its own auth and mirrors; kiln reads the layer blobs
from containerd's content store and builds each image's ext4 disk once;
containers get a small writable disk over it (or a copy of it). Plug kiln
into containerd with "kiln containerd-config -o /etc/containerd/conf.d/kiln.toml".`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			f := cmd.Flags()
			if f.Changed("root") {
				cfg.Root = root
			}
			if f.Changed("address") {
				cfg.Address = address
			}
			if f.Changed("containerd-address") {
				cfg.ContainerdAddress = containerd
			}
			if !cmd.Flags().Changed("log-level") {
				if err := log.SetLevel(cfg.LogLevel); err != nil {
					return fmt.Errorf("config: log_level: %w", err)
				}
			}
			if cfg.LogFormat == "json" {
				if err := log.SetFormat(log.JSONFormat); err != nil {
					return err
				}
			}
			ctx := cmd.Context()
			svc, err := service.New(ctx, cfg)
			if err != nil {
				return err
			}
			defer svc.Close()
			return svc.Serve(ctx, notifyReady)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultPath, "configuration file")
	f.StringVar(&root, "root", "", "state directory (default from the config: /var/lib/kiln)")
	f.StringVar(&address, "address", "", "unix socket to serve on (default from the config: /run/kiln/kiln.sock)")
	f.StringVar(&containerd, "containerd-address", "", "containerd's socket (default from the config: /run/containerd/containerd.sock)")
	return cmd
}

// notifyReady tells systemd (Type=notify) that kiln is serving.
func notifyReady() {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	addr := &net.UnixAddr{Name: sock, Net: "unixgram"}
	if sock[0] == '@' {
		addr.Name = "\x00" + sock[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return
	}
	defer conn.Close()
	conn.Write([]byte("READY=1")) //nolint:errcheck // best effort, as sd_notify
}
