package service

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	namespacesapi "github.com/containerd/containerd/api/services/namespaces/v1"
	"github.com/containerd/containerd/v2/core/content"
	cimages "github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/plugin/snapshotter"
)

// containerdImages answers the snapshotter's questions about containerd's
// images through containerd's API.
type containerdImages struct {
	images     imagesapi.ImagesClient
	namespaces namespacesapi.NamespacesClient
	content    content.Provider

	mu     sync.Mutex
	chains map[digest.Digest][]imageConfig // by image target: never changes
}

// maxCachedImages bounds the images whose configs are remembered.
const maxCachedImages = 10000

// imageConfig is one platform's config of an image, and the manifest
// that names it ("" if it cannot be found).
type imageConfig struct {
	chainID  digest.Digest
	raw      []byte
	manifest digest.Digest
}

func newContainerdImages(images imagesapi.ImagesClient, ns namespacesapi.NamespacesClient, cs content.Provider) *containerdImages {
	return &containerdImages{images: images, namespaces: ns, content: cs, chains: map[digest.Digest][]imageConfig{}}
}

// configs returns the configs of an image, one per platform whose
// content is here.
func (c *containerdImages) configs(ctx context.Context, target ocispec.Descriptor) []imageConfig {
	c.mu.Lock()
	got, ok := c.chains[target.Digest]
	c.mu.Unlock()
	if ok {
		return got
	}
	ps, err := cimages.Platforms(ctx, c.content, target)
	if err != nil || len(ps) == 0 {
		ps = []ocispec.Platform{platforms.DefaultSpec()}
	}
	seen := map[digest.Digest]bool{}
	var out []imageConfig
	complete := err == nil
	for _, p := range ps {
		desc, err := cimages.Config(ctx, c.content, target, platforms.Only(p))
		if err != nil || seen[desc.Digest] {
			// Content not here (a platform not pulled), or a failure
			// worth asking again for.
			complete = complete && (err == nil || errdefs.IsNotFound(err))
			continue
		}
		seen[desc.Digest] = true
		raw, err := content.ReadBlob(ctx, c.content, desc)
		if err != nil {
			complete = false
			continue
		}
		var img ocispec.Image
		if json.Unmarshal(raw, &img) != nil {
			continue
		}
		out = append(out, imageConfig{chainID: identity.ChainID(img.RootFS.DiffIDs), raw: raw,
			manifest: manifestOf(ctx, c.content, target, desc.Digest, 0)})
	}
	if !complete {
		return out // not remembered: the next question asks again
	}
	c.mu.Lock()
	if len(c.chains) > maxCachedImages {
		clear(c.chains)
	}
	c.chains[target.Digest] = out
	c.mu.Unlock()
	return out
}

// manifestOf returns the digest of the manifest under desc whose config
// is config, "" if none is here.
func manifestOf(ctx context.Context, cs content.Provider, desc ocispec.Descriptor, config digest.Digest, depth int) digest.Digest {
	switch {
	case cimages.IsManifestType(desc.MediaType):
		raw, err := content.ReadBlob(ctx, cs, desc)
		if err != nil {
			return ""
		}
		var m ocispec.Manifest
		if json.Unmarshal(raw, &m) == nil && m.Config.Digest == config {
			return desc.Digest
		}
	case cimages.IsIndexType(desc.MediaType) && depth < 4:
		children, err := cimages.Children(ctx, cs, desc)
		if err != nil {
			return ""
		}
		for _, ch := range children {
			if d := manifestOf(ctx, cs, ch, config, depth+1); d != "" {
				return d
			}
		}
	}
	return ""
}

// Config implements snapshotter.Images.
func (c *containerdImages) Config(ctx context.Context, ns, ref string, chainID digest.Digest) ([]byte, error) {
	ctx = namespaces.WithNamespace(ctx, ns)
	if ref != "" {
		resp, err := c.images.Get(ctx, &imagesapi.GetImageRequest{Name: ref})
		if err != nil {
			return nil, fmt.Errorf("image %s in namespace %s: %w", ref, ns, errgrpc.ToNative(err))
		}
		for _, cfg := range c.configs(ctx, oci.DescriptorFromProto(resp.Image.Target)) {
			if chainID == "" || cfg.chainID == chainID {
				return cfg.raw, nil
			}
		}
		return nil, fmt.Errorf("image %s in namespace %s is not made of the layers of %s: %w", ref, ns, chainID, errdefs.ErrNotFound)
	}
	var found []byte
	var names []string
	err := c.made(ctx, chainID, func(name string, cfg imageConfig) error {
		names = append(names, name)
		if found != nil && string(found) != string(cfg.raw) {
			sort.Strings(names)
			return fmt.Errorf("images %s share the layers of %s but not their config: %w",
				strings.Join(names, ", "), chainID, errdefs.ErrConflict)
		}
		found = cfg.raw
		return nil
	})
	if err != nil {
		return nil, err
	}
	if found == nil {
		return nil, fmt.Errorf("no image in namespace %s is made of the layers of %s: %w", ns, chainID, errdefs.ErrNotFound)
	}
	return found, nil
}

// made calls fn with each image of ctx's namespace, and its config, that
// is made of the layers of chainID.
func (c *containerdImages) made(ctx context.Context, chainID digest.Digest, fn func(name string, cfg imageConfig) error) error {
	resp, err := c.images.List(ctx, &imagesapi.ListImagesRequest{})
	if err != nil {
		return errgrpc.ToNative(err)
	}
	for _, img := range resp.Images {
		for _, cfg := range c.configs(ctx, oci.DescriptorFromProto(img.Target)) {
			if cfg.chainID != chainID {
				continue
			}
			if err := fn(img.Name, cfg); err != nil {
				return err
			}
		}
	}
	return nil
}

// Named implements snapshotter.Images.
func (c *containerdImages) Named(ctx context.Context, ns string, chainID digest.Digest) ([]snapshotter.NamedImage, error) {
	var named []snapshotter.NamedImage
	err := c.made(namespaces.WithNamespace(ctx, ns), chainID, func(name string, cfg imageConfig) error {
		if cfg.manifest != "" {
			named = append(named, snapshotter.NamedImage{Name: name, Manifest: cfg.manifest})
		}
		return nil
	})
	return named, err
}

// Tops implements snapshotter.Images.
func (c *containerdImages) Tops(ctx context.Context) (map[digest.Digest]bool, error) {
	nss, err := c.namespaces.List(ctx, &namespacesapi.ListNamespacesRequest{})
	if err != nil {
		return nil, errgrpc.ToNative(err)
	}
	tops := map[digest.Digest]bool{}
	for _, ns := range nss.Namespaces {
		nctx := namespaces.WithNamespace(ctx, ns.Name)
		resp, err := c.images.List(nctx, &imagesapi.ListImagesRequest{})
		if err != nil {
			return nil, errgrpc.ToNative(err)
		}
		for _, img := range resp.Images {
			for _, cfg := range c.configs(nctx, oci.DescriptorFromProto(img.Target)) {
				tops[cfg.chainID] = true
			}
		}
	}
	return tops, nil
}

// watchImages calls changed whenever containerd deletes or updates an
// image, until ctx ends, subscribing again when the connection breaks.
func watchImages(ctx context.Context, events eventsapi.EventsClient, changed func()) {
	backoff := time.Second
	for ctx.Err() == nil {
		stream, err := events.Subscribe(ctx, &eventsapi.SubscribeRequest{
			Filters: []string{`topic=="/images/delete"`, `topic=="/images/update"`},
		})
		if err == nil {
			for {
				if _, err = stream.Recv(); err != nil {
					break
				}
				backoff = time.Second
				changed()
			}
		}
		if ctx.Err() != nil {
			return
		}
		log.G(ctx).WithError(err).Debug("watching containerd's image events")
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}
