// Package testimage builds the images kiln's tests convert: layer tars
// written entry by entry or taken from a real directory tree, packed as
// OCI image layouts, docker save archives, or pushed to a registry.
package testimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Compression of a layer blob.
type Compression string

const (
	Gzip Compression = "gzip"
	Zstd Compression = "zstd"
	None Compression = "none"
)

// Layer is one uncompressed layer tar and how to store it.
type Layer struct {
	// Tar is the layer's content; use File for big layers.
	Tar  []byte
	File string
	// Compression of the blob (default gzip).
	Compression Compression
}

// Image describes an image to assemble.
type Image struct {
	Layers []Layer
	// Config is the runtime config (Entrypoint, Cmd, Env, ...).
	Config v1.Config
	OS     string // default linux
	Arch   string // default amd64
}

// Build assembles a v1.Image with OCI media types.
func Build(spec Image) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for i, l := range spec.Layers {
		vl, err := buildLayer(l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: vl, MediaType: mediaType(l.Compression)}); err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = or(spec.OS, "linux"), or(spec.Arch, "amd64")
	cf.Config = spec.Config
	return mutate.ConfigFile(img, cf)
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func mediaType(c Compression) types.MediaType {
	switch c {
	case None:
		return types.OCIUncompressedLayer
	case Zstd:
		return types.OCILayerZStd
	}
	return types.OCILayer
}

func buildLayer(l Layer) (v1.Layer, error) {
	data := l.Tar
	if l.File != "" {
		b, err := os.ReadFile(l.File)
		if err != nil {
			return nil, err
		}
		data = b
	}
	switch l.Compression {
	case None:
		return static.NewLayer(data, types.OCIUncompressedLayer), nil
	case Zstd:
		var buf bytes.Buffer
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			return nil, err
		}
		if _, err := zw.Write(data); err != nil {
			return nil, err
		}
		if err := zw.Close(); err != nil {
			return nil, err
		}
		return tarball.LayerFromOpener(opener(buf.Bytes()), tarball.WithMediaType(types.OCILayerZStd))
	}
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if _, err := zw.Write(data); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return tarball.LayerFromOpener(opener(buf.Bytes()), tarball.WithMediaType(types.OCILayer))
}

func opener(b []byte) tarball.Opener {
	return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}

// WriteLayout writes img into an OCI image layout at dir, tagged tag.
func WriteLayout(dir, tag string, img v1.Image) error {
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			return err
		}
	}
	return p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag}))
}

// WriteIndexLayout writes several platform images as one multi-platform
// index into an OCI layout at dir, tagged tag.
func WriteIndexLayout(dir, tag string, imgs map[string]v1.Image) error {
	var adds []mutate.IndexAddendum
	for plat, img := range imgs {
		p, err := v1.ParsePlatform(plat)
		if err != nil {
			return err
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			return err
		}
	}
	return p.AppendIndex(idx, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag}))
}

// Push uploads img (or an index) to a registry reference.
func Push(ref string, img v1.Image) error {
	r, err := name.ParseReference(ref)
	if err != nil {
		return err
	}
	return remote.Write(r, img)
}

// PushIndex uploads a multi-platform index to a registry reference.
func PushIndex(ref string, imgs map[string]v1.Image) error {
	r, err := name.ParseReference(ref)
	if err != nil {
		return err
	}
	var adds []mutate.IndexAddendum
	for plat, img := range imgs {
		p, err := v1.ParsePlatform(plat)
		if err != nil {
			return err
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	return remote.WriteIndex(r, mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...))
}

// WriteDockerArchive writes a `docker save` style archive: manifest.json,
// the config, and each layer as an uncompressed <id>/layer.tar.
func WriteDockerArchive(path, repoTag string, spec Image) error {
	var diffIDs []string
	var tars [][]byte
	for _, l := range spec.Layers {
		data := l.Tar
		if l.File != "" {
			b, err := os.ReadFile(l.File)
			if err != nil {
				return err
			}
			data = b
		}
		h, _, err := v1.SHA256(bytes.NewReader(data))
		if err != nil {
			return err
		}
		diffIDs = append(diffIDs, h.String())
		tars = append(tars, data)
	}
	cfg := map[string]any{
		"architecture": or(spec.Arch, "amd64"),
		"os":           or(spec.OS, "linux"),
		"config":       spec.Config,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	ch, _, _ := v1.SHA256(bytes.NewReader(cfgJSON))
	var layerPaths []string
	for _, d := range diffIDs {
		layerPaths = append(layerPaths, strings.TrimPrefix(d, "sha256:")+"/layer.tar")
	}
	manifest, _ := json.Marshal([]map[string]any{{
		"Config": ch.Hex + ".json", "RepoTags": []string{repoTag}, "Layers": layerPaths,
	}})
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for i, p := range layerPaths {
		if err := add(p, tars[i]); err != nil {
			return err
		}
	}
	if err := add(ch.Hex+".json", cfgJSON); err != nil {
		return err
	}
	if err := add("manifest.json", manifest); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
