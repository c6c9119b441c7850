package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kilnfs/kiln/internal/convert"
	"github.com/kilnfs/kiln/internal/progress"
	"github.com/kilnfs/kiln/internal/store"
	"github.com/kilnfs/kiln/internal/version"
)

func newConvertCommand() *cobra.Command {
	var (
		output   string
		platform string
		size     string
		cacheDir string
		insecure []string
		asJSON   bool
	)
	cmd := &cobra.Command{
		Use:   "convert SOURCE -o rootfs.ext4",
		Short: "Convert an image to an ext4 rootfs without containerd",
		Long: `Convert an image to an ext4 root filesystem that a microVM boots directly.

SOURCE is one of
  REGISTRY/REPO[:TAG|@DIGEST]   an image in a registry; credentials come from
                                your docker config.json (auths, credsStore,
                                credHelpers)
  oci:DIR[:TAG]                 an OCI image layout directory
  docker-archive:FILE           a "docker save" tarball

Plain HTTP is used only for loopback registries and those named with
--insecure-registry. Layer blobs and built images are cached per digest in
--cache-dir; converting an image that was built before costs a copy.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output == "" {
				return fmt.Errorf("--output is required")
			}
			sz, err := parseSize(size)
			if err != nil {
				return err
			}
			opts := convert.Options{CacheDir: cacheDir}
			opts.Image.Platform = platform
			opts.Image.Insecure = insecure
			opts.Image.UserAgent = version.UserAgent()
			opts.Build.Size = sz
			if !asJSON && term.IsTerminal(int(os.Stderr.Fd())) {
				opts.Progress = progress.Terminal(os.Stderr)
			}
			res, err := convert.Convert(cmd.Context(), args[0], output, opts)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "", "where to write the ext4 image")
	f.StringVar(&platform, "platform", "", "platform to select from a multi-platform image, os/arch[/variant] (default: this host's)")
	f.StringVar(&size, "size", "auto", "filesystem size: auto (content plus headroom) or a size such as 2G, 512MiB")
	f.StringVar(&cacheDir, "cache-dir", store.DefaultDir(), "cache for layer blobs and built images")
	f.StringSliceVar(&insecure, "insecure-registry", nil, "registry (host[:port]) that may use plain HTTP or unverified TLS; repeatable")
	f.BoolVar(&asJSON, "json", false, "print a JSON summary (digest, chain ID, size, path, timings)")
	return cmd
}

// parseSize reads "auto" or a size with an optional K/M/G/T suffix (binary
// multiples; "MiB", "MB", "M" are the same).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "auto" {
		return 0, nil
	}
	num := strings.TrimRight(strings.ToUpper(s), "IB")
	mult := int64(1)
	if n := len(num); n > 0 {
		switch num[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("--size %q: want auto or a size such as 2G", s)
	}
	return v * mult, nil
}
