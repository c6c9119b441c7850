package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/internal/convert"
	"github.com/kilnfs/kiln/internal/fusedisk"
)

// The mounted file answers SEEK_DATA and SEEK_HOLE from the image's index.
var _ fusedisk.HoleSource = (*convert.Lazy)(nil)

func newMountCommand() *cobra.Command {
	var (
		flags    buildFlags
		name     string
		timeout  time.Duration
		prefetch bool
		workers  int
	)
	cmd := &cobra.Command{
		Use:   "mount IMAGE DIR",
		Short: "Serve an image's rootfs as a file whose chunks are fetched when read",
		Long: `Find the chunked rootfs that kiln push --chunked published beside a registry
image (built with the same options) and serve it as a read-only file,
DIR/rootfs.ext4, through FUSE, until interrupted or unmounted. A VMM opens
that file as the root disk: the VM boots before the image has arrived.

A read fetches the chunks it touches with range requests, checks each
against its digest and keeps it in the chunk cache under --cache-dir,
shared by every image (with --cache-max-size, within what the budget
leaves beside the cache's images and blobs, least recently used first
out; kiln cache ls and prune cover them); a chunk that does not verify is
never served, and a read that
takes longer than --timeout fails with an I/O error. The chunks the first
boot read are recorded as the image's boot profile; later mounts fetch
them first, then, with --prefetch, the rest of the image.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := flags.options()
			if err != nil {
				return err
			}
			if workers < 1 {
				return fmt.Errorf("--prefetch-workers %d: want 1 or more", workers)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			l, err := convert.OpenLazy(ctx, args[0], opts, timeout)
			if err != nil {
				return err
			}
			defer l.Close()
			m, err := fusedisk.Mount(args[1], l, fusedisk.Options{Name: name, Timeout: timeout})
			if err != nil {
				return fmt.Errorf("mounting %s: %w", args[1], err)
			}
			log.G(ctx).WithFields(log.Fields{"image": l.Image.Name, "artifact": l.Artifact, "file": m.Path(), "size": l.Size()}).Info("serving the rootfs")
			pctx, cancelPrefetch := context.WithCancel(ctx)
			prefetched := make(chan struct{})
			go func() {
				defer close(prefetched)
				if err := l.Prefetch(pctx, prefetch, workers); err != nil {
					log.G(ctx).WithError(err).Warn("prefetching stopped")
				}
			}()
			unmounted := make(chan struct{})
			go func() { m.Wait(); close(unmounted) }()
			select {
			case <-ctx.Done():
				if err := m.Unmount(); err != nil {
					log.G(ctx).WithError(err).Warn("unmounting")
				}
				<-unmounted
			case <-unmounted:
			}
			cancelPrefetch()
			<-prefetched
			if err := l.SaveProfile(); err != nil {
				log.G(ctx).WithError(err).Warn("recording the boot profile")
			}
			st := l.Stats()
			log.G(ctx).WithFields(log.Fields{"fetched_bytes": st.FetchedBytes, "fetched_chunks": st.FetchedChunks}).Info("unmounted")
			if flags.asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(struct {
					Image    string `json:"image"`
					Key      string `json:"key"`
					Artifact string `json:"artifact"`
					File     string `json:"file"`
					Size     int64  `json:"size"`
					RootHash string `json:"root_hash,omitempty"`
					Fetched  any    `json:"fetched"`
				}{l.Image.Name, l.Key, l.Artifact, filepath.Join(args[1], name), l.Size(), l.RootHash, st})
			}
			return nil
		},
	}
	flags.register(cmd.Flags())
	f := cmd.Flags()
	f.MarkHidden("use-published") //nolint:errcheck // it exists
	f.StringVar(&name, "name", "rootfs.ext4", "the file's name in DIR")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "a read whose chunks take longer to arrive fails with an I/O error")
	f.BoolVar(&prefetch, "prefetch", false, "after the boot profile, fetch the rest of the image in the background")
	f.IntVar(&workers, "prefetch-workers", 4, "fetches at a time when prefetching")
	return cmd
}
