package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/layer"
)

// fromArchive reads a `docker save` tarball, "FILE" or "FILE:REPO:TAG" for
// archives holding several images.
func fromArchive(spec string, want ocispec.Platform) (*Image, error) {
	file, ref := spec, ""
	if _, err := os.Stat(spec); err != nil {
		if i := strings.IndexByte(spec, ':'); i > 0 {
			file, ref = spec[:i], spec[i+1:]
		}
	}
	if _, err := os.Stat(file); err != nil {
		return nil, fmt.Errorf("docker archive: %w", err)
	}
	var tag *name.Tag
	if ref != "" {
		t, err := name.NewTag(ref)
		if err != nil {
			return nil, fmt.Errorf("docker archive tag %q: %w", ref, err)
		}
		tag = &t
	}
	archive := func() (io.ReadCloser, error) { return os.Open(file) }
	m, err := tarball.LoadManifest(archive)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: %w", file, err)
	}
	d, err := findArchiveImage(m, tag)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: %w", file, err)
	}
	raw, err := readArchiveFile(archive, d.Config)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: config: %w", file, err)
	}
	out, err := describeArchive(archive, raw, d.Layers, want)
	if err != nil {
		return nil, fmt.Errorf("docker archive %s: %w", file, err)
	}
	return out, nil
}

// findArchiveImage picks the image tag names from an archive's
// manifest.json, or its only image.
func findArchiveImage(m tarball.Manifest, tag *name.Tag) (*tarball.Descriptor, error) {
	if tag == nil {
		if len(m) != 1 {
			return nil, fmt.Errorf("the archive holds %d images: name one as FILE:REPO:TAG", len(m))
		}
		return &m[0], nil
	}
	for i, d := range m {
		for _, s := range d.RepoTags {
			if t, err := name.NewTag(s); err == nil && t.Name() == tag.Name() {
				return &m[i], nil
			}
		}
	}
	return nil, fmt.Errorf("tag %s not found in the archive", tag)
}

// describeArchive is describe for docker archives. Their layers are
// usually plain tars and have no media type: kiln reads the layer files
// itself, decompressing as their first bytes say, so the blob it verifies
// is the tar itself and its digest is the diffID. The image's manifest
// and digest are not asked for either (go-containerregistry would gzip
// every layer to make them): the config digest (Docker's image ID)
// identifies it instead.
func describeArchive(archive tarball.Opener, raw []byte, layers []string, want ocispec.Platform) (*Image, error) {
	cfg, err := parseConfig(raw)
	if err != nil {
		return nil, err
	}
	plat := ocispec.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}
	if err := checkPlatform(plat, want); err != nil {
		return nil, err
	}
	if len(layers) != len(cfg.RootFS.DiffIDs) {
		return nil, fmt.Errorf("manifest.json lists %d layers, the config %d diffIDs", len(layers), len(cfg.RootFS.DiffIDs))
	}
	out := &Image{
		Digest:     digest.FromBytes(raw),
		Platform:   plat,
		Config:     cfg,
		ConfigJSON: raw,
	}
	for i, diffID := range cfg.RootFS.DiffIDs {
		file := layers[i]
		out.Layers = append(out.Layers, Layer{
			Descriptor: layer.Descriptor{MediaType: layer.MediaTypeDockerLayerPlain, Digest: diffID, DiffID: diffID},
			Size:       -1,
			open:       func() (io.ReadCloser, error) { return openArchiveLayer(archive, file) },
		})
	}
	return out, nil
}

// openArchiveLayer streams the tar of the layer file at name.
func openArchiveLayer(archive tarball.Opener, name string) (io.ReadCloser, error) {
	f, err := openArchiveFile(archive, name, 0)
	if err != nil {
		return nil, err
	}
	tr, err := layer.Uncompressed(f, "")
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return struct {
		io.Reader
		io.Closer
	}{tr, closers{tr, f}}, nil
}

type closers []io.Closer

func (cs closers) Close() error {
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

func readArchiveFile(archive tarball.Opener, name string) ([]byte, error) {
	f, err := openArchiveFile(archive, name, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// openArchiveFile streams the file at name in the archive, following
// links within it (Docker's archives link layer files to blobs).
func openArchiveFile(archive tarball.Opener, name string, depth int) (io.ReadCloser, error) {
	if depth > 8 {
		return nil, fmt.Errorf("%s: too many links", name)
	}
	f, err := archive()
	if err != nil {
		return nil, err
	}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err != nil {
			f.Close()
			if err == io.EOF {
				return nil, fmt.Errorf("%s: not in the archive", name)
			}
			return nil, err
		}
		if path.Clean(hdr.Name) != path.Clean(name) {
			continue
		}
		if hdr.Typeflag == tar.TypeSymlink || hdr.Typeflag == tar.TypeLink {
			f.Close()
			target := hdr.Linkname
			if hdr.Typeflag == tar.TypeSymlink {
				target = path.Join(path.Dir(name), target)
			}
			return openArchiveFile(archive, target, depth+1)
		}
		return struct {
			io.Reader
			io.Closer
		}{tr, f}, nil
	}
}
