package image

import (
	"errors"
	"fmt"
	"os"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// fromLayout reads an OCI image layout, "DIR" or "DIR:TAG". TAG matches
// the org.opencontainers.image.ref.name annotation of an index.json entry
// (or containerd's io.containerd.image.name); without TAG the layout must
// hold exactly one entry.
func fromLayout(spec string, want ocispec.Platform) (*Image, error) {
	dir, tag := spec, ""
	if _, err := os.Stat(spec); err != nil {
		if i := strings.LastIndexByte(spec, ':'); i > 0 {
			dir, tag = spec[:i], spec[i+1:]
		}
	}
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("OCI layout: %w", err)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	var entry *v1.Descriptor
	var names []string
	for i := range m.Manifests {
		d := &m.Manifests[i]
		ref := d.Annotations[ocispec.AnnotationRefName]
		if ref == "" {
			ref = d.Annotations["io.containerd.image.name"]
		}
		names = append(names, ref)
		if tag == "" || ref == tag || strings.HasSuffix(ref, ":"+tag) {
			if entry != nil && tag == "" {
				return nil, fmt.Errorf("OCI layout %s holds %d images; name one with oci:%s:TAG (%s)",
					dir, len(m.Manifests), dir, strings.Join(names, ", "))
			}
			if entry == nil {
				entry = d
			}
		}
	}
	if len(m.Manifests) == 0 {
		return nil, errors.New("the image index is empty")
	}
	if entry == nil {
		return nil, fmt.Errorf("OCI layout %s has no image tagged %q (it has: %s)", dir, tag, strings.Join(names, ", "))
	}
	if entry.MediaType.IsIndex() {
		img, plat, err := selectPlatform(nestedIndex{idx, entry.Digest}, want)
		if err != nil {
			return nil, err
		}
		return describe(img, plat, want, openCompressed, nil)
	}
	img, err := idx.Image(entry.Digest)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", entry.Digest, err)
	}
	var plat ocispec.Platform
	if entry.Platform != nil {
		plat = ocispec.Platform{OS: entry.Platform.OS, Architecture: entry.Platform.Architecture, Variant: entry.Platform.Variant}
		if err := checkPlatform(plat, want); err != nil {
			return nil, err
		}
	}
	return describe(img, plat, want, openCompressed, nil)
}
