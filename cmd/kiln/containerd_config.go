package main

import (
	"fmt"
	"text/template"

	"github.com/containerd/platforms"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/config"
)

// containerdConfig is the fragment containerd 2.x (config version 3)
// needs: kiln's snapshotter and differ as proxy plugins (one entry each,
// since an entry has one type), unpacking into kiln with kiln's differ for
// `ctr image pull --snapshotter kiln` (the list replaces containerd's
// default, so overlayfs is listed again), and kiln's differ first in the
// diff service's order so that client-side (--local) unpacks use it.
var containerdConfig = template.Must(template.New("").Parse(`# kiln: add to containerd's config.toml (version = 3), then restart containerd.
[proxy_plugins.{{.Snapshotter}}]
  type = "snapshot"
  address = "{{.Address}}"
  [proxy_plugins.{{.Snapshotter}}.exports]
    root = "{{.Root}}"

[proxy_plugins.{{.Differ}}]
  type = "diff"
  address = "{{.Address}}"

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "{{.Platform}}"
  snapshotter = "{{.Snapshotter}}"
  differ = "{{.Differ}}"

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "{{.Platform}}"
  snapshotter = "overlayfs"
  differ = "walking"

[plugins.'io.containerd.service.v1.diff-service']
  default = ["{{.Differ}}", "walking"]
`))

func newContainerdConfigCommand() *cobra.Command {
	var (
		configPath string
		address    string
		platform   string
	)
	cmd := &cobra.Command{
		Use:   "containerd-config",
		Short: "Print the containerd config that plugs kiln in",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("address") {
				cfg.Address = address
			}
			if platform == "" {
				platform = platforms.DefaultString()
			}
			return containerdConfig.Execute(cmd.OutOrStdout(), map[string]string{
				"Snapshotter": "kiln",
				"Differ":      "kiln-diff",
				"Address":     cfg.Address,
				"Root":        cfg.Root,
				"Platform":    platform,
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultPath, "kiln's configuration file")
	f.StringVar(&address, "address", "", "kiln's socket (default from the config)")
	f.StringVar(&platform, "platform", "", fmt.Sprintf("platform to unpack for (default %s)", platforms.DefaultString()))
	return cmd
}
