package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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

// buildFlags are the flags of the commands that convert an image: what
// to convert and how.
type buildFlags struct {
	platform     string
	size         string
	cacheDir     string
	cacheMax     string
	insecure     []string
	hostsDir     string
	asJSON       bool
	pieces       string
	bundle       string
	force        bool
	guestBin     string
	writer       string
	limits       []string
	usePublished bool
	verity       bool
}

func (b *buildFlags) register(f *pflag.FlagSet) {
	f.StringVar(&b.platform, "platform", "", "platform of the image, os/arch[/variant]: selects from a multi-platform image; a single-platform image must match it (default: this host's)")
	f.StringVar(&b.size, "size", "auto", "filesystem size: auto (content plus headroom) or a size such as 2G, 512MiB")
	f.StringVar(&b.writer, "writer", build.DefaultWriter.Name(), "how the ext4 is laid out: "+strings.Join(build.WriterNames(), " (one pass, in Go) or ")+" (mke2fs and debugfs, the reference)")
	f.StringVar(&b.cacheDir, "cache-dir", store.DefaultDir(), "cache for layer blobs and built images")
	f.StringVar(&b.cacheMax, "cache-max-size", "", "after converting, evict least recently used images, blobs and chunks until the cache takes at most this much disk, such as 20G (default: no limit)")
	f.StringSliceVar(&b.insecure, "insecure-registry", nil, "registry (host[:port]) that may use plain HTTP or unverified TLS; repeatable")
	f.StringVar(&b.hostsDir, "hosts-dir", image.DefaultHostsDir, "containerd-style registry host configuration (REGISTRY/hosts.toml: mirrors, TLS, headers); empty: none")
	f.BoolVar(&b.asJSON, "json", false, "print a JSON summary (digest, chain ID, size, path, init, verity, timings)")
	f.BoolVar(&b.verity, "verity", false, "append a dm-verity hash tree after the filesystem (see the verity object of --json)")
	f.StringVar(&b.pieces, "inject", "", "guest pieces to add: init, agent, network (comma-separated; default none: the rootfs is the image, exactly)")
	f.StringVar(&b.bundle, "inject-dir", "", "add a bundle of your own: a directory with a manifest.toml of paths, owners and modes")
	f.BoolVar(&b.force, "force", false, "let injected files replace files the image has (default: refuse)")
	f.StringArrayVar(&b.limits, "limit", nil, "change a limit on what an image may make kiln do, NAME=VALUE (repeatable; 0 is none): "+limitsHelp())
	f.StringVar(&b.guestBin, "guest-bin-dir", "", "where kiln-init and kiln-agent are (default: next to kiln, in $PATH, or in libexec)")
	f.BoolVar(&b.usePublished, "use-published", false, "use a rootfs of the same build that kiln push published beside a registry image, if one verifies, instead of building (trusts whoever can push to the image's repository: see SECURITY.md)")
}

func (b *buildFlags) options() (convert.Options, error) {
	sz, err := config.ParseSize(b.size)
	if err != nil {
		return convert.Options{}, fmt.Errorf("--size: %w", err)
	}
	opts := convert.Options{CacheDir: b.cacheDir}
	if b.cacheMax != "" {
		if opts.CacheMaxSize, err = config.ParseSize(b.cacheMax); err != nil || opts.CacheMaxSize == 0 {
			return opts, fmt.Errorf("--cache-max-size %q: want a size such as 10G", b.cacheMax)
		}
	}
	opts.Image.Platform = b.platform
	opts.Image.Insecure = b.insecure
	opts.Image.HostsDir = b.hostsDir
	opts.Image.UserAgent = version.UserAgent()
	opts.Build.Size = sz
	opts.Build.Verity = b.verity
	if opts.Build.Writer, err = build.WriterNamed(b.writer); err != nil {
		return opts, fmt.Errorf("--writer: %w", err)
	}
	if opts.Inject.Pieces, err = guest.ParsePieces(b.pieces); err != nil {
		return opts, fmt.Errorf("--inject: %w", err)
	}
	opts.Inject.Dir, opts.Inject.Force, opts.Inject.BinDir = b.bundle, b.force, b.guestBin
	lim := config.DefaultLimits()
	for _, kv := range b.limits {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return opts, fmt.Errorf("--limit %q: want NAME=VALUE", kv)
		}
		if err := lim.Set(name, value); err != nil {
			return opts, fmt.Errorf("--limit: %w", err)
		}
	}
	if opts.Build.Limits, err = lim.Parse(); err != nil {
		return opts, fmt.Errorf("--limit: %w", err)
	}
	opts.Share.Pull = b.usePublished
	if !b.asJSON && term.IsTerminal(int(os.Stderr.Fd())) {
		opts.Progress = progress.Terminal(os.Stderr)
	}
	return opts, nil
}

// run converts src to output ("" for the cache only) and prints the
// summary if asked to.
func (b *buildFlags) run(cmd *cobra.Command, src, output string, opts convert.Options) error {
	res, err := convert.Convert(cmd.Context(), src, output, opts)
	if errors.Is(err, image.ErrPlatformNotFound) && b.platform == "" {
		return fmt.Errorf("%w (choose one with --platform)", err)
	}
	if err != nil {
		return err
	}
	if b.asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	return nil
}

func newConvertCommand() *cobra.Command {
	var (
		output string
		flags  buildFlags
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
--cache-max-size keeps the cache within a budget, evicting what was least
recently used after each conversion; kiln cache ls, rm and prune manage it
by hand.

--verity appends a dm-verity hash tree (sha256, 4 KiB blocks) after the
filesystem, whose size stays the same; --json reports the root hash and
the rest of the verity table.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output == "" {
				return fmt.Errorf("--output is required")
			}
			opts, err := flags.options()
			if err != nil {
				return err
			}
			return flags.run(cmd, args[0], output, opts)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "", "where to write the ext4 image")
	flags.register(f)
	return cmd
}

func newPushCommand() *cobra.Command {
	var (
		flags     buildFlags
		isChunked bool
		chunkSize string
	)
	cmd := &cobra.Command{
		Use:   "push IMAGE",
		Short: "Build an image's rootfs and publish it beside the image in its registry",
		Long: `Build the ext4 rootfs of a registry image (or take it from the cache) and
publish it beside the image: an OCI artifact whose subject is the image's
manifest, holding the zstd-compressed ext4 and annotations saying which
build it is (kiln's format, the chain ID, the options that change bytes)
and what the image hashes to.

kiln convert on any machine, with the same options, finds it through the
registry's referrers API (or the referrers tag schema) and downloads it
instead of building; the build is reproducible, so it is the same bytes.
Credentials come from your docker config.json; the artifact goes to the
registry itself, never to a mirror.

With --chunked, the ext4 is published cut into chunks (512 KiB, each
compressed on its own, packed into blobs) with an index: kiln mount
serves it to a VM as it boots, fetching only the chunks it reads.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := flags.options()
			if err != nil {
				return err
			}
			opts.Share.Pull, opts.Share.Push = false, true
			if isChunked {
				if opts.Share.ChunkSize, err = config.ParseSize(chunkSize); err != nil || opts.Share.ChunkSize == 0 {
					return fmt.Errorf("--chunk-size %q: want a size such as 512K", chunkSize)
				}
			}
			return flags.run(cmd, args[0], "", opts)
		},
	}
	flags.register(cmd.Flags())
	cmd.Flags().BoolVar(&isChunked, "chunked", false, "publish the rootfs cut into chunks, for kiln mount, instead of whole")
	cmd.Flags().StringVar(&chunkSize, "chunk-size", "512K", "with --chunked, the size of a chunk (a multiple of 4K, at most 16M)")
	cmd.Flags().MarkHidden("use-published") //nolint:errcheck // it exists
	return cmd
}

// limitsHelp lists the limits with their defaults.
func limitsHelp() string {
	d := config.DefaultLimits()
	return fmt.Sprintf("layer_bytes=%s image_bytes=%s entries=%d path_depth=%d file_size=%s xattr_bytes=%s",
		d.LayerBytes, d.ImageBytes, d.Entries, d.PathDepth, d.FileSize, d.XattrBytes)
}
