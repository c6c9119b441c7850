// Command kiln turns OCI container images into ext4 root filesystems that
// microVMs boot directly: standalone (kiln convert) or as a containerd
// proxy snapshotter and differ (kiln serve).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/internal/gcheadroom"
	"github.com/kilnfs/kiln/internal/version"
)

func main() {
	gcheadroom.Start()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := &cobra.Command{
		Use:           "kiln",
		Short:         "Turn OCI images into ext4 root filesystems for microVMs",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	var logLevel string
	root.PersistentFlags().StringVar(&logLevel, "log-level", "error", "log level: debug, info, warn, error (kiln serve: log_level from its config unless given)")
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		return log.SetLevel(logLevel)
	}
	root.AddCommand(newConvertCommand(), newPushCommand(), newServeCommand(), newExportCommand(), newContainerdConfigCommand(), newBootCommand(), newConfigCommand(), newCacheCommand(), newMountCommand())
	if err := root.ExecuteContext(ctx); err != nil {
		var exit exitError
		if errors.As(err, &exit) {
			os.Exit(int(exit)) // the status of what ran; it spoke for itself
		}
		fmt.Fprintf(os.Stderr, "kiln: %v\n", err)
		os.Exit(1)
	}
}

// exitError carries a specific exit status.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
