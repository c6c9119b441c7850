package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kilnfs/kiln/config"
	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/convert"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/image"
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
		hostsDir string
		asJSON   bool
		pieces   string
		bundle   string
		force    bool
		guestBin string
		writer   string
		limits   []string
		dmVerity bool
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

--inject init adds kiln-init at /.kiln/init (boot with init=/.kiln/init) for
images without an init system; agent adds kiln-agent; network adds the
network bootstrap for systemd images.

Mirrors, TLS settings and headers come from containerd's hosts.toml files
(--hosts-dir, default /etc/containerd/certs.d), as for containerd itself.
Plain HTTP is used only for loopback registries, those named with
--insecure-registry and endpoints a hosts.toml gives as http://.
Layer blobs and built images are cached per digest in
--cache-dir; converting an image that was built before costs a copy.

--verity appends a dm-verity hash tree (sha256, 4 KiB blocks) after the
filesystem, whose size stays the same; --json reports the root hash and
the rest of the verity table.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output == "" {
				return fmt.Errorf("--output is required")
			}
			sz, err := config.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			opts := convert.Options{CacheDir: cacheDir}
			opts.Image.Platform = platform
			opts.Image.Insecure = insecure
			opts.Image.HostsDir = hostsDir
			opts.Image.UserAgent = version.UserAgent()
			opts.Build.Size = sz
			opts.Build.Verity = dmVerity
			if opts.Build.Writer, err = build.WriterNamed(writer); err != nil {
				return fmt.Errorf("--writer: %w", err)
			}
			if opts.Inject.Pieces, err = guest.ParsePieces(pieces); err != nil {
				return fmt.Errorf("--inject: %w", err)
			}
			opts.Inject.Dir, opts.Inject.Force, opts.Inject.BinDir = bundle, force, guestBin
			lim := config.DefaultLimits()
			for _, kv := range limits {
				name, value, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("--limit %q: want NAME=VALUE", kv)
				}
				if err := lim.Set(name, value); err != nil {
					return fmt.Errorf("--limit: %w", err)
				}
			}
			if opts.Build.Limits, err = lim.Parse(); err != nil {
				return fmt.Errorf("--limit: %w", err)
			}
			if !asJSON && term.IsTerminal(int(os.Stderr.Fd())) {
				opts.Progress = progress.Terminal(os.Stderr)
			}
			res, err := convert.Convert(cmd.Context(), args[0], output, opts)
			if errors.Is(err, image.ErrPlatformNotFound) && platform == "" {
				return fmt.Errorf("%w (choose one with --platform)", err)
			}
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
	f.StringVar(&platform, "platform", "", "platform of the image, os/arch[/variant]: selects from a multi-platform image; a single-platform image must match it (default: this host's)")
	f.StringVar(&size, "size", "auto", "filesystem size: auto (content plus headroom) or a size such as 2G, 512MiB")
	f.StringVar(&writer, "writer", build.DefaultWriter.Name(), "how the ext4 is laid out: "+strings.Join(build.WriterNames(), " (one pass, in Go) or ")+" (mke2fs and debugfs, the reference)")
	f.StringVar(&cacheDir, "cache-dir", store.DefaultDir(), "cache for layer blobs and built images")
	f.StringSliceVar(&insecure, "insecure-registry", nil, "registry (host[:port]) that may use plain HTTP or unverified TLS; repeatable")
	f.StringVar(&hostsDir, "hosts-dir", image.DefaultHostsDir, "containerd-style registry host configuration (REGISTRY/hosts.toml: mirrors, TLS, headers); empty: none")
	f.BoolVar(&asJSON, "json", false, "print a JSON summary (digest, chain ID, size, path, init, verity, timings)")
	f.BoolVar(&dmVerity, "verity", false, "append a dm-verity hash tree after the filesystem (see the verity object of --json)")
	f.StringVar(&pieces, "inject", "", "guest pieces to add: init, agent, network (comma-separated; default none: the rootfs is the image, exactly)")
	f.StringVar(&bundle, "inject-dir", "", "add a bundle of your own: a directory with a manifest.toml of paths, owners and modes")
	f.BoolVar(&force, "force", false, "let injected files replace files the image has (default: refuse)")
	f.StringArrayVar(&limits, "limit", nil, "change a limit on what an image may make kiln do, NAME=VALUE (repeatable; 0 is none): "+limitsHelp())
	f.StringVar(&guestBin, "guest-bin-dir", "", "where kiln-init and kiln-agent are (default: next to kiln, in $PATH, or in libexec)")
	return cmd
}

// limitsHelp lists the limits with their defaults.
func limitsHelp() string {
	d := config.DefaultLimits()
	return fmt.Sprintf("layer_bytes=%s image_bytes=%s entries=%d path_depth=%d file_size=%s xattr_bytes=%s",
		d.LayerBytes, d.ImageBytes, d.Entries, d.PathDepth, d.FileSize, d.XattrBytes)
}
