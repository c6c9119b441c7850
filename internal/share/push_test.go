package share

import (
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/image"
)

// TestPublishChecksPushFirst: credentials that may pull but not push
// fail the publish before the rootfs is read (here it does not exist),
// with the registry's own reason; where pushing is allowed the check
// starts an upload, cancels it, and the publish goes on to the rootfs.
// A registry that fails the check for another reason (busy) is left to
// the upload.
func TestPublishChecksPushFirst(t *testing.T) {
	for _, tc := range []struct {
		name   string
		refuse int // the status of a write; 0: served
		want   string
		writes []string
	}{
		{"pull only", http.StatusForbidden, "DENIED", []string{"POST /v2/app/blobs/uploads/"}},
		{"push allowed", 0, "no such file", []string{"POST /v2/app/blobs/uploads/", "DELETE /v2/app/blobs/uploads/"}},
		{"busy", http.StatusServiceUnavailable, "no such file", []string{"POST /v2/app/blobs/uploads/"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
			var mu sync.Mutex
			var writes []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodGet && r.Method != http.MethodHead {
					mu.Lock()
					// The upload's own name is the registry's: not
					// compared.
					writes = append(writes, r.Method+" "+r.URL.Path[:min(len(r.URL.Path), len("/v2/app/blobs/uploads/"))])
					mu.Unlock()
					if tc.refuse != 0 {
						w.Header().Set("Content-Type", "application/json")
						w.WriteHeader(tc.refuse)
						w.Write([]byte(`{"errors":[{"code":"DENIED","message":"this account may only pull"}]}`)) //nolint:errcheck // test server
						return
					}
				}
				reg.ServeHTTP(w, r)
			}))
			defer srv.Close()
			ctx := context.Background()
			target, err := image.Server(ctx, strings.TrimPrefix(srv.URL, "http://")+"/app:v1", image.Options{})
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			for _, publish := range map[string]func() error{
				"whole": func() error {
					_, err := Publish(ctx, target, digest.FromString("manifest"), filepath.Join(dir, "missing.ext4"), build.Identity{}, dir)
					return err
				},
				"chunked": func() error {
					_, err := PublishChunked(ctx, target, digest.FromString("manifest"), filepath.Join(dir, "missing.ext4"), build.Identity{}, 512<<10, dir)
					return err
				},
			} {
				mu.Lock()
				writes = nil
				mu.Unlock()
				if err := publish(); err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("publish: %v, want an error saying %q", err, tc.want)
				}
				mu.Lock()
				if !slices.Equal(writes, tc.writes) {
					t.Errorf("the registry was asked to %q, want %q", writes, tc.writes)
				}
				mu.Unlock()
			}
		})
	}
}
