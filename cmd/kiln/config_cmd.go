package main

import (
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/config"
)

func newConfigCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Show kiln serve's configuration"}
	cmd.AddCommand(&cobra.Command{
		Use:   "default",
		Short: "Print the default configuration (what an empty /etc/kiln/config.toml gives)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := config.Default().Encode()
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	})
	return cmd
}
