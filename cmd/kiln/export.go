package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"
	"github.com/spf13/cobra"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/clone"
	"github.com/kilnfs/kiln/internal/inject"
)

func newExportCommand() *cobra.Command {
	var (
		output      string
		namespace   string
		address     string
		snapshotter string
		platform    string
	)
	cmd := &cobra.Command{
		Use:   "export IMAGE -o rootfs.ext4",
		Short: "Write the ext4 of an image pulled with the kiln snapshotter",
		Long: `Write the ext4 rootfs of an image that containerd unpacked with the kiln
snapshotter (ctr image pull --snapshotter kiln IMAGE). For the same image and
options the file is byte-identical to what "kiln convert" writes. With the
init piece injected, the image's own config is written into the copy.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output == "" {
				return errors.New("--output is required")
			}
			return export(cmd.Context(), args[0], output, address, namespace, snapshotter, platform)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "", "where to write the ext4 image")
	f.StringVarP(&namespace, "namespace", "n", "default", "containerd namespace of the image")
	f.StringVarP(&address, "address", "a", "/run/containerd/containerd.sock", "containerd's socket")
	f.StringVar(&snapshotter, "snapshotter", "kiln", "name of kiln's snapshotter in containerd's config")
	f.StringVar(&platform, "platform", "", "platform of the image to export (default: this host's)")
	return cmd
}

func export(ctx context.Context, ref, output, address, namespace, snapshotter, platform string) error {
	client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace), containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", address, err)
	}
	defer client.Close()
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		return err
	}
	defer done(context.WithoutCancel(ctx))

	i, err := client.ImageService().Get(ctx, ref)
	if err != nil {
		return fmt.Errorf("image %s in namespace %s: %w", ref, namespace, err)
	}
	matcher := platforms.Default()
	if platform != "" {
		p, err := platforms.Parse(platform)
		if err != nil {
			return fmt.Errorf("--platform: %w", err)
		}
		matcher = platforms.Only(p)
	}
	img := containerd.NewImageWithPlatform(client, i, matcher)
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	chainID := identity.ChainID(diffIDs).String()
	sn := client.SnapshotService(snapshotter)
	if _, err := sn.Stat(ctx, chainID); err != nil {
		if errdefs.IsNotFound(err) {
			return fmt.Errorf("image %s is not unpacked with the %s snapshotter; pull it with: ctr image pull --snapshotter %s %s",
				ref, snapshotter, snapshotter, ref)
		}
		return fmt.Errorf("image %s: snapshot %s: %w", ref, chainID, err)
	}
	var nonce [6]byte
	rand.Read(nonce[:]) //nolint:errcheck // never fails
	key := "kiln-export-" + hex.EncodeToString(nonce[:])
	mounts, err := sn.View(ctx, key, chainID)
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	defer sn.Remove(context.WithoutCancel(ctx), key) //nolint:errcheck // the lease cleans up too
	if len(mounts) != 1 || mounts[0].Type != "ext4" {
		return fmt.Errorf("snapshotter %s did not return one ext4 mount: is it kiln?", snapshotter)
	}
	src := mounts[0].Source
	if strings.HasPrefix(src, "/dev/loop") {
		// Block-device mode: copy the file behind the device, which
		// keeps the holes.
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(src), "loop", "backing_file"))
		if err != nil {
			return fmt.Errorf("finding the file behind %s: %w", src, err)
		}
		src = strings.TrimSpace(string(b))
	}
	// A disk built with the init piece is shared by the images with the
	// same layers; the image's own config goes into its copy.
	stamp := func(f *os.File) error {
		needs, err := inject.NeedsConfig(f)
		if err != nil || !needs {
			return err
		}
		desc, err := img.Config(ctx)
		if err != nil {
			return fmt.Errorf("image %s: %w", ref, err)
		}
		config, err := content.ReadBlob(ctx, client.ContentStore(), desc)
		if err != nil {
			return fmt.Errorf("image %s: config: %w", ref, err)
		}
		wd, err := os.MkdirTemp("", "kiln-export-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(wd)
		return inject.StampConfig(ctx, f, config, "", build.Epoch, wd)
	}
	if err := clone.AtomicThen(src, output, 0o644, stamp); err != nil {
		return fmt.Errorf("writing %s: %w", output, err)
	}
	return nil
}
