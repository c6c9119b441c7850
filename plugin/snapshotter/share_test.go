package snapshotter

import (
	"testing"

	snpkg "github.com/containerd/containerd/v2/pkg/snapshotters"
)

// TestSourceOf: only an image's top layer, as containerd labels it, names
// the image its disk is shared under.
func TestSourceOf(t *testing.T) {
	const (
		ref      = "registry.example/app:v1"
		manifest = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		base     = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
		top      = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	)
	labels := func(layer, above, m string) map[string]string {
		return map[string]string{
			snpkg.TargetRefLabel: ref, snpkg.TargetManifestDigestLabel: m,
			snpkg.TargetLayerDigestLabel: layer, snpkg.TargetImageLayersLabel: above,
		}
	}
	for _, tc := range []struct {
		name   string
		labels map[string]string
		ok     bool
	}{
		{"top layer", labels(top, top, manifest), true},
		{"base layer", labels(base, base+","+top, manifest), false},
		{"no labels", nil, false},
		{"bad manifest digest", labels(top, top, "sha256:xyz"), false},
		{"no image layers", labels(top, "", manifest), false},
	} {
		src, ok := sourceOf(tc.labels)
		if ok != tc.ok || ok && (src.ref != ref || src.manifest.String() != manifest) {
			t.Errorf("%s: sourceOf = %+v, %v; want ok %v", tc.name, src, ok, tc.ok)
		}
	}
}
