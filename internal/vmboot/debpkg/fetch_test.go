package debpkg_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/vmboot/debpkg"
	"github.com/kilnfs/kiln/internal/vmboot/vmboottest"
)

// TestFetchConcurrent downloads a small package into an empty cache from
// several goroutines at once: all must get the same complete directory.
func TestFetchConcurrent(t *testing.T) {
	const name = "busybox-static"
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	pkg, err := debpkg.Candidate(ctx, name)
	if err != nil {
		vmboottest.Unavailable(t, "cannot look up %s: %v", name, err)
	}

	cache := t.TempDir()
	const n = 3
	dirs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { dirs[i], errs[i] = debpkg.Fetch(ctx, cache, pkg.Name, pkg.Version) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			vmboottest.Unavailable(t, "cannot download %s (offline?): %v", name, err)
		}
		if dirs[i] != dirs[0] {
			t.Errorf("Fetch returned %s and %s", dirs[0], dirs[i])
		}
	}
	if _, err := os.Stat(filepath.Join(dirs[0], "bin", "busybox")); err != nil {
		t.Errorf("unpacked package incomplete: %v", err)
	}
	// Nothing temporary is left behind.
	left, _ := filepath.Glob(filepath.Join(cache, "deb", ".tmp-*"))
	if len(left) > 0 {
		t.Errorf("temporary files left: %q", left)
	}
}
