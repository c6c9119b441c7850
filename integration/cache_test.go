package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
)

// TestConvertCacheDirPrivate: kiln refuses a cache directory that another
// user owns or that others may write to, whether given with --cache-dir or
// the default one in the temporary directory (no home directory), and
// creates the default one private.
func TestConvertCacheDirPrivate(t *testing.T) {
	needRoot(t, "making directories owned by another user and running kiln as nobody")
	const nobody, other = 65534, 65533
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("hello", 0o644, t1, "private"))}}})
	ref := mustPush(t, "cachedir:v1", img)
	dir := sharedTempDir(t, "kiln-cachedir-")
	mkdir := func(name string, mode os.FileMode, uid int) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
		return p
	}

	// As root, with --cache-dir.
	for _, cache := range []string{mkdir("nobodys", 0o700, nobody), mkdir("open", 0o777, 0)} {
		msg := convertFails(t, ref, filepath.Join(dir, "refused.ext4"), cache)
		if !strings.Contains(msg, cache+" is") || !strings.Contains(msg, "refusing") {
			t.Errorf("the error does not say that kiln refuses %s:\n%s", cache, msg)
		}
		if left := findName(cache, ""); len(left) > 0 {
			t.Errorf("kiln wrote into the refused cache %s: %v", cache, left)
		}
	}

	// As nobody without a home directory: the cache is kiln-UID in
	// $TMPDIR, which anyone could have made first.
	tmp := mkdir("tmp", 0o777|os.ModeSticky, 0)
	out := mkdir("out", 0o755, nobody)
	docker := mkdir("docker", 0o755, nobody)
	asNobody := func(env map[string]string) result {
		t.Helper()
		env["PATH"], env["DOCKER_CONFIG"] = "/usr/local/bin:/usr/bin:/bin", docker
		return kiln(t, run{
			args: []string{"convert", "--json", ref, "-o", filepath.Join(out, "rootfs.ext4")},
			env:  env, dir: dir,
			cred: &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{}},
		})
	}
	fallback := filepath.Join(tmp, "kiln-65534")
	for _, planted := range []struct {
		mode os.FileMode
		uid  int
	}{{0o700, other}, {0o777, nobody}} {
		p := mkdir("tmp/kiln-65534", planted.mode, planted.uid)
		res := asNobody(map[string]string{"HOME": "", "TMPDIR": tmp})
		if res.err == nil {
			t.Errorf("kiln used %s (mode %04o, owner %d)", p, planted.mode, planted.uid)
		} else {
			t.Logf("error output: %s", strings.TrimSpace(res.stderr))
			if !strings.Contains(res.stderr, fallback+" is") || !strings.Contains(res.stderr, "refusing") {
				t.Errorf("the error does not say that kiln refuses %s:\n%s", fallback, res.stderr)
			}
		}
		if err := os.RemoveAll(p); err != nil {
			t.Fatal(err)
		}
	}
	if res := asNobody(map[string]string{"HOME": "", "TMPDIR": tmp}); res.err != nil {
		t.Fatalf("kiln as nobody with a fresh default cache: %v\n%s", res.err, res.stderr)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fallback, &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != nobody || st.Mode&0o777 != 0o700 {
		t.Errorf("%s: owner %d mode %04o, want %d 0700", fallback, st.Uid, st.Mode&0o777, nobody)
	}

	// XDG_CACHE_HOME comes first.
	xdg := mkdir("xdg", 0o755, nobody)
	if res := asNobody(map[string]string{"HOME": "", "TMPDIR": tmp, "XDG_CACHE_HOME": xdg}); res.err != nil {
		t.Fatalf("kiln as nobody with XDG_CACHE_HOME: %v\n%s", res.err, res.stderr)
	}
	if _, err := os.Stat(filepath.Join(xdg, "kiln", "rootfs")); err != nil {
		t.Errorf("no cache under XDG_CACHE_HOME: %v", err)
	}
}

// bigImage pushes an image whose first layer is a gzip blob of about
// 40 MiB (long enough to fetch that runs overlap) and whose second is small.
func bigImage(t *testing.T, repoTag string) (string, v1.Image) {
	t.Helper()
	big, _ := bigFileLayer(t, t.TempDir(), 48<<20)
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{
		{File: big},
		{Tar: layerTar(t, tFile("small", 0o644, t1, "the second layer"))},
	}})
	return mustPush(t, repoTag, img), img
}

// checkBlobs fails the test unless every layer blob in the cache is what
// its name says.
func checkBlobs(t *testing.T, cache string) {
	t.Helper()
	blobs := filepath.Join(cache, "content", "blobs", "sha256")
	ents, err := os.ReadDir(blobs)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if got := fileSHA(t, filepath.Join(blobs, e.Name())); got != e.Name() {
			t.Errorf("cached blob sha256:%s holds sha256:%s", e.Name(), got)
		}
	}
}

// TestConvertSharedCacheConcurrent runs several conversions of the same
// image at once, sharing one cache: they fetch the same blobs at the same
// time. Every run must succeed with the same bytes, and every blob the
// cache keeps must be intact.
func TestConvertSharedCacheConcurrent(t *testing.T) {
	ref, _ := bigImage(t, "shared-cache:v1")
	dir := t.TempDir()
	const runs = 4
	for round := range 2 {
		cache := filepath.Join(dir, fmt.Sprintf("cache%d", round))
		results := make([]result, runs)
		var wg sync.WaitGroup
		for i := range runs {
			wg.Go(func() {
				out := filepath.Join(dir, fmt.Sprintf("out%d-%d.ext4", round, i))
				results[i] = kiln(t, run{args: convertArgs(ref, out, cache)})
			})
		}
		wg.Wait()
		sums := map[string]string{}
		for i, res := range results {
			if res.err != nil {
				t.Errorf("round %d, run %d: %v\n%s", round, i, res.err, res.stderr)
				continue
			}
			out := filepath.Join(dir, fmt.Sprintf("out%d-%d.ext4", round, i))
			sums[out] = fileSHA(t, out)
		}
		if len(unique(sums)) > 1 {
			t.Errorf("round %d: the runs wrote different images: %v", round, sums)
		}
		checkBlobs(t, cache)
		if t.Failed() {
			return
		}
	}
}

// TestConvertEvictsDamagedBlob damages the cached blobs of an image: a
// hole of zeros in the middle of one (it stops decompressing there), a
// changed last byte in the other (it decompresses, then fails its
// digest). The next conversion that reads them evicts both with a
// warning, fetches them again and succeeds, with the bytes an intact
// cache gives.
func TestConvertEvictsDamagedBlob(t *testing.T) {
	ref, img := bigImage(t, "damaged-blob:v1")
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	want := filepath.Join(dir, "want.ext4")
	convert(t, ref, want, cache)

	digests := layerDigests(t, img)
	damage := func(d string, at func(size int64) int64, with func([]byte)) {
		t.Helper()
		f, err := os.OpenFile(filepath.Join(cache, "content", "blobs", "sha256", strings.TrimPrefix(d, "sha256:")), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		off := at(fi.Size())
		buf := make([]byte, min(64<<10, fi.Size()-off))
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		with(buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	damage(digests[0], func(size int64) int64 { return size / 2 }, func(b []byte) { clear(b) })
	damage(digests[1], func(size int64) int64 { return size - 1 }, func(b []byte) { b[0] ^= 0xff })
	// The built image is cached too: without it, the layers are read.
	built, _ := filepath.Glob(filepath.Join(cache, "rootfs", "*"))
	for _, p := range built {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}

	n := len(reg.Requests())
	out := filepath.Join(dir, "out.ext4")
	res := kiln(t, run{args: append(convertArgs(ref, out, cache), "--log-level", "warn")})
	if res.err != nil {
		t.Fatalf("converting with damaged cached blobs: %v\n%s", res.err, res.stderr)
	}
	t.Logf("warnings: %s", strings.TrimSpace(res.stderr))
	if fileSHA(t, out) != fileSHA(t, want) {
		t.Errorf("the image built from blobs fetched again differs from the first one")
	}
	fetched := blobFetches("damaged-blob", n)
	for _, d := range digests {
		if !strings.Contains(res.stderr, "evict") || !strings.Contains(res.stderr, d) {
			t.Errorf("no warning says that the blob %s was evicted", d)
		}
		if !slices.Contains(fetched, d) {
			t.Errorf("the blob %s was not fetched again (fetched: %v)", d, fetched)
		}
	}
	checkBlobs(t, cache)
}
