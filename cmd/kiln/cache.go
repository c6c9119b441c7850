package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/config"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/workdir"
)

func newCacheCommand() *cobra.Command {
	var cacheDir string
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "List, remove and prune what kiln convert and kiln mount cached",
		Long: `kiln convert caches layer blobs and built images in --cache-dir, and kiln
mount the chunks of lazily loaded images. These commands show what it
holds and free space. Entries a running kiln convert uses are never
removed: they are skipped. A chunk a running kiln mount reads is fetched
again if it was pruned.`,
	}
	cmd.PersistentFlags().StringVar(&cacheDir, "cache-dir", store.DefaultDir(), "the cache kiln convert uses")
	open := func() (*store.Store, error) {
		if err := workdir.Private(cacheDir); err != nil {
			return nil, fmt.Errorf("cache directory: %w", err)
		}
		return store.Open(cacheDir)
	}
	cmd.AddCommand(newCacheLsCommand(open), newCacheRmCommand(open), newCachePruneCommand(open))
	return cmd
}

type openStore func() (*store.Store, error)

func newCacheLsCommand(open openStore) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the cached images, layer blobs and chunks, least recently used first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := open()
			if err != nil {
				return err
			}
			list, err := st.List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), list)
			}
			return printListing(cmd.OutOrStdout(), list)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the listing as JSON")
	return cmd
}

func newCacheRmCommand(open openStore) *cobra.Command {
	var blobs, asJSON bool
	cmd := &cobra.Command{
		Use:   "rm [KEY|IMAGE...] [--blobs]",
		Short: "Remove cached images, and with --blobs the layer blobs no cached image was built from",
		Long: `Remove cached images, each named by its build key (or a unique start of
it) or by an image reference or digest it was built from, as kiln cache ls
shows them. With --blobs, then remove the layer blobs that no image left in
the cache was built from.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && !blobs {
				return fmt.Errorf("name images to remove, or give --blobs")
			}
			ctx := cmd.Context()
			st, err := open()
			if err != nil {
				return err
			}
			l, err := st.Manage(ctx)
			if err != nil {
				return err
			}
			res, err := removeImages(ctx, st, args)
			l.Unlock()
			if err == nil && blobs {
				var br *store.Removed
				if br, err = st.RemoveUnusedBlobs(ctx); br != nil {
					res.Blobs, res.Skipped, res.Freed = br.Blobs, res.Skipped+br.Skipped, res.Freed+br.Freed
					res.Left = br.Left
				}
			}
			if err != nil {
				return err
			}
			return printRemoved(cmd.OutOrStdout(), res, asJSON)
		},
	}
	cmd.Flags().BoolVar(&blobs, "blobs", false, "also remove the layer blobs that no cached image was built from")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was removed as JSON")
	return cmd
}

// removeImages removes the images args name; one in use fails the command
// after the others are removed.
func removeImages(ctx context.Context, st *store.Store, args []string) (*store.Removed, error) {
	res := &store.Removed{}
	if len(args) == 0 {
		return res, nil
	}
	list, err := st.List(ctx)
	if err != nil {
		return nil, err
	}
	found, err := store.Find(list, args)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, im := range found {
		if err := st.RemoveImage(im.Key); err != nil {
			if errors.Is(err, store.ErrInUse) {
				res.Skipped++
			}
			errs = append(errs, err)
			continue
		}
		res.Images = append(res.Images, im)
		res.Freed += im.Allocated
	}
	res.Left = list.Total() - res.Freed
	return res, errors.Join(errs...)
}

func newCachePruneCommand(open openStore) *cobra.Command {
	var (
		maxSize string
		all     bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "prune --max-size SIZE | --all",
		Short: "Evict least recently used images, blobs and chunks until the cache fits in SIZE",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if all == (maxSize != "") {
				return fmt.Errorf("give one of --max-size and --all")
			}
			limit := int64(-1)
			if !all {
				var err error
				if limit, err = config.ParseSize(maxSize); err != nil || limit == 0 {
					return fmt.Errorf("--max-size %q: want a size such as 10G", maxSize)
				}
			}
			st, err := open()
			if err != nil {
				return err
			}
			res, err := st.Prune(cmd.Context(), limit)
			if err != nil {
				return err
			}
			return printRemoved(cmd.OutOrStdout(), res, asJSON)
		},
	}
	cmd.Flags().StringVar(&maxSize, "max-size", "", "the most the cache may take on disk, such as 10G")
	cmd.Flags().BoolVar(&all, "all", false, "remove everything no running kiln convert uses")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was removed as JSON")
	return cmd
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printListing(w io.Writer, list *store.Listing) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE KEY\tON DISK\tSIZE\tLAST USED\tSOURCE\tDIGEST\tCHAIN ID\tOPTIONS")
	for _, im := range list.Images {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", im.Key[:min(12, len(im.Key))],
			humanSize(im.Allocated), humanSize(im.Size), ago(im.LastUsed),
			orDash(strings.Join(sources(im), ", ")), orDash(short(im.Digest.Encoded())),
			orDash(short(im.ChainID.Encoded())), orDash(options(im.Options)))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "BLOB\tON DISK\tSIZE\tLAST USED")
	for _, b := range list.Blobs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", b.Digest.Algorithm().String()+":"+short(b.Digest.Encoded()),
			humanSize(b.Allocated), humanSize(b.Size), ago(b.LastUsed))
	}
	if c := list.Chunks; c.Count > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "CHUNKS (kiln mount)\tON DISK\tLAST USED")
		fmt.Fprintf(tw, "%d\t%s\t%s\n", c.Count, humanSize(c.Allocated), ago(c.LastUsed))
	}
	fmt.Fprintf(tw, "\ntotal on disk: %s\n", humanSize(list.Total()))
	return tw.Flush()
}

func printRemoved(w io.Writer, res *store.Removed, asJSON bool) error {
	if asJSON {
		return printJSON(w, res)
	}
	for _, im := range res.Images {
		fmt.Fprintf(w, "removed image %s (%s, %s)\n", im.Key[:min(12, len(im.Key))], orDash(im.Image), humanSize(im.Allocated))
	}
	for _, b := range res.Blobs {
		fmt.Fprintf(w, "removed blob %s (%s)\n", b.Digest, humanSize(b.Allocated))
	}
	if c := res.Chunks; c.Count > 0 {
		fmt.Fprintf(w, "removed %d chunks (%s)\n", c.Count, humanSize(c.Allocated))
	}
	fmt.Fprintf(w, "freed %s; the cache takes %s", humanSize(res.Freed), humanSize(res.Left))
	if res.Skipped > 0 {
		fmt.Fprintf(w, "; %d in use by running conversions kept", res.Skipped)
	}
	fmt.Fprintln(w)
	return nil
}

// sources is the image's first reference and every other one served.
func sources(im store.Image) []string {
	out := []string{}
	if im.Image != "" {
		out = append(out, im.Image)
	}
	for _, r := range im.Refs {
		if r != im.Image {
			out = append(out, r)
		}
	}
	return out
}

func options(o map[string]string) string {
	var parts []string
	for _, k := range []string{"size", "writer", "inject", "inject_dir", "force"} {
		if v, ok := o[k]; ok {
			parts = append(parts, k+"="+v)
		}
	}
	return strings.Join(parts, " ")
}

func short(s string) string { return s[:min(12, len(s))] }

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// humanSize writes bytes in binary units, as --size and --max-size read
// them.
func humanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, exp := float64(n)/unit, 0
	for v >= unit && exp < 4 {
		v /= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[exp])
}

// ago says how long ago t was, to the second.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}
