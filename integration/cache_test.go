package integration

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

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
