package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/diff"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/core/snapshots"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnfs/kiln/integration/ext4inspect"
	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/integration/testregistry"
	"github.com/kilnfs/kiln/internal/testenv"
)

// The tests in this file run a real containerd (built from the version
// go.mod pins) with a real kiln serve as its proxy snapshotter and differ,
// pulling from the test registry on 127.0.0.1.

// startContainerd starts containerd and kiln serve for one test, stopped
// (and their logs shown if the test failed) when it ends.
func startContainerd(t *testing.T, opts testcontainerd.Options) *testcontainerd.Env {
	t.Helper()
	needRoot(t, "containerd and kiln serve run as root and loop-mount ext4 files")
	if opts.Kiln == "" {
		opts.Kiln = kilnBin
	}
	e, err := testcontainerd.Start(opts)
	if errors.Is(err, testcontainerd.ErrUnavailable) {
		testenv.Unavailable(t, "containerd cannot run here: %v", err)
	}
	if err != nil {
		t.Fatalf("starting containerd and kiln serve: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kiln serve log:\n%s", ctdTail(e.KilnLogs(), 6000))
			t.Logf("containerd's warnings and errors:\n%s", ctdTail(ctdProblems(e.ContainerdLog()), 6000))
		}
		if err := e.Close(); err != nil {
			t.Errorf("stopping containerd and kiln serve: %v", err)
		}
	})
	return e
}

// ctdProblems keeps the warnings and errors of a log, but for the cgroup
// v1 deprecation containerd repeats.
func ctdProblems(log string) string {
	var keep []string
	for _, l := range strings.Split(log, "\n") {
		if (strings.Contains(l, "level=warning") || strings.Contains(l, "level=error")) && !strings.Contains(l, "cgroup v1") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func ctdTail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// ctr runs ctr and fails the test if it fails.
func ctr(t *testing.T, e *testcontainerd.Env, args ...string) string {
	t.Helper()
	out, err := ctrRun(t, e, args...)
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, ctdTail(out, 4000))
	}
	return out
}

// ctrFails runs ctr, fails the test if it succeeds, and returns its output.
func ctrFails(t *testing.T, e *testcontainerd.Env, args ...string) string {
	t.Helper()
	out, err := ctrRun(t, e, args...)
	if err == nil {
		t.Fatalf("ctr %s succeeded, want an error\n%s", strings.Join(args, " "), ctdTail(out, 4000))
	}
	t.Logf("the error: %s", ctdLastLine(out))
	return out
}

func ctrRun(t *testing.T, e *testcontainerd.Env, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := e.Ctr(ctx, args...)
	t.Logf("ctr %s: %v in %v", strings.Join(args, " "), errOr(err, "ok"), time.Since(start).Round(time.Millisecond))
	return out, err
}

// ctdPullArgs are the arguments of a pull with the kiln snapshotter: through
// containerd's transfer service, or unpacked by the client (--local).
// Both speak plain HTTP to a registry on 127.0.0.1 by themselves.
func ctdPullArgs(ns, ref string, local bool) []string {
	args := []string{"-n", ns, "image", "pull", "--snapshotter", "kiln"}
	if local {
		args = append(args, "--local")
	}
	return append(args, ref)
}

// ctdExport runs kiln export and fails the test if it fails.
func ctdExport(t *testing.T, e *testcontainerd.Env, ns, ref, out string) {
	t.Helper()
	res := kiln(t, run{args: []string{"export", ref, "-o", out, "--namespace", ns, "--address", e.Address}})
	if res.err != nil {
		t.Fatalf("kiln export %s: %v\n%s", ref, res.err, res.stderr)
	}
}

// ctdChainID is the chain ID of an image's layers, the key of its top
// snapshot.
func ctdChainID(t testing.TB, img v1.Image) string {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	var ids []digest.Digest
	for _, h := range cf.RootFS.DiffIDs {
		ids = append(ids, digest.Digest(h.String()))
	}
	return identity.ChainID(ids).String()
}

// Layer times of the containerd edge-case image.
var (
	ctdT1 = time.Unix(1610000000, 111111111)
	ctdT2 = time.Unix(1620000000, 222222222)
	ctdT3 = time.Unix(1630000000, 333333333)
)

// ctdEdgeImage is a three-layer image (gzip, zstd, uncompressed) with what
// layers make awkward: whiteouts (of a file, a directory, one name of a
// hard-linked triple, of nothing), an opaque directory, a file replaced by
// a directory and a directory by a file, hard links, symlinks with
// relative, absolute, dangling and 3000-byte targets, device nodes
// (beyond 8-bit numbers too) and a fifo, xattrs (security.capability,
// user.* on a file and a directory), owners beyond 16 and 31 bits,
// setuid, setgid, sticky and mode 0, 255-byte names, a 1000-byte path,
// names with a line break, invalid UTF-8 and UTF-8, a time after 2038,
// and directories that later layers write into without an entry of their
// own (one of them 0700 and owned by 1000, with an xattr).
//
// With full, the image also has what containerd's walking differ cannot
// reproduce, whatever the snapshotter: a hard link in layer 2 to a file of
// layer 1 (it fails: the target is not in the layer's upper directory), a
// file written through a directory symlink of layer 1 (it would make the
// symlink a directory), a trusted.* xattr (it drops those) and a time
// before 1970 (it makes that 1970).
func ctdEdgeImage(t *testing.T, full bool) testimage.Image {
	capValue := string([]byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) // cap_net_bind_service+e
	xa := tFile("xa/file", 0o755, ctdT1, "with xattrs")
	xa.hdr.PAXRecords = map[string]string{
		"SCHILY.xattr.security.capability": capValue,
		"SCHILY.xattr.user.long":           strings.Repeat("v", 200),
	}
	if full {
		xa.hdr.PAXRecords["SCHILY.xattr.trusted.t"] = "trusted value"
	}
	xaDir := tDir("xa/dir", 0o755, ctdT1)
	xaDir.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.d": "on a directory"}
	big := tFile("own/big", 0o640, ctdT1, "big ids")
	big.hdr.Uid, big.hdr.Gid = 70000, 80000
	huge := tFile("own/huge", 0o600, ctdT1, "huge ids")
	huge.hdr.Uid, huge.hdr.Gid = 4000000000, 4000000001
	priv := tDir("priv", 0o700, ctdT1)
	priv.hdr.Uid, priv.hdr.Gid = 1000, 1000
	priv.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.p": "private"}
	deep := "long"
	var deepDirs []tarEntry
	for _, c := range "abcd" {
		deep += "/" + strings.Repeat(string(c), 250)
		deepDirs = append(deepDirs, tDir(deep, 0o755, ctdT1))
	}
	l1 := append([]tarEntry{
		tDir("etc", 0o755, ctdT1),
		tFile("etc/hosts", 0o644, ctdT1, "127.0.0.1 localhost\n"),
		tDir("wh", 0o755, ctdT1),
		tFile("wh/file1", 0o644, ctdT1, "file1"),
		tDir("wh/dir1", 0o755, ctdT1),
		tFile("wh/dir1/inner", 0o644, ctdT1, "inner"),
		tFile("wh/keep", 0o644, ctdT1, "keep"),
		tDir("opq", 0o755, ctdT1),
		tFile("opq/lower", 0o644, ctdT1, "lower"),
		tDir("opq/lowerdir", 0o755, ctdT1),
		tFile("opq/lowerdir/x", 0o644, ctdT1, "x"),
		tFile("f2d", 0o644, ctdT1, "a file, then a directory"),
		tDir("d2f", 0o755, ctdT1),
		tFile("d2f/child", 0o644, ctdT1, "child"),
		tDir("hl", 0o755, ctdT1),
		tFile("hl/lower", 0o644, ctdT1, "hard-linked from layer 2"),
		tDir("hw", 0o755, ctdT1),
		tFile("hw/a", 0o644, ctdT1, "two names"),
		tHardlink("hw/b", "hw/a", ctdT1),
		tHardlink("hw/c", "hw/a", ctdT1),
		tDir("usr", 0o755, ctdT1),
		tDir("usr/lib", 0o755, ctdT1),
		tSymlink("lib", "usr/lib", ctdT1),
		tDir("links", 0o755, ctdT1),
		tSymlink("links/rel", "../etc/hosts", ctdT1),
		tSymlink("links/abs", "/etc/hosts", ctdT1),
		tSymlink("links/dangling", "does/not/exist", ctdT1),
		tSymlink("links/long", "/"+strings.Repeat("t/", 1500)+"end", ctdT1),
		tDir("dev", 0o755, ctdT1),
		tDevice("dev/null", tar.TypeChar, 1, 3, 0o666, ctdT1),
		tDevice("dev/sda", tar.TypeBlock, 8, 0, 0o660, ctdT1),
		tDevice("dev/big", tar.TypeChar, 300, 70000, 0o600, ctdT1),
		tDevice("dev/fifo", tar.TypeFifo, 0, 0, 0o644, ctdT1),
		tDir("xa", 0o755, ctdT1),
		xa, xaDir,
		tDir("own", 0o755, ctdT1),
		big, huge,
		tDir("modes", 0o755, ctdT1),
		tFile("modes/suid", 0o4755, ctdT1, "suid"),
		tFile("modes/sgid", 0o2755, ctdT1, "sgid"),
		tDir("modes/sticky", 0o1777, ctdT1),
		tFile("modes/none", 0, ctdT1, "none"),
		priv,
		tFile("priv/a", 0o600, ctdT1, "a"),
		tDir("long", 0o755, ctdT1),
		tFile("long/"+strings.Repeat("n", 255), 0o644, ctdT1, "255 bytes of name"),
	}, deepDirs...)
	l1 = append(l1, tFile(deep+"/deep", 0o644, ctdT1, "deep"))

	l2 := []tarEntry{
		tDir("wh", 0o755, ctdT2),
		tWhiteout("wh/.wh.file1", ctdT2),
		tWhiteout("wh/.wh.dir1", ctdT2),
		tWhiteout("wh/.wh.nothing", ctdT2), // hides nothing
		tDir("opq", 0o750, ctdT2),
		tWhiteout("opq/.wh..wh..opq", ctdT2),
		tFile("opq/new", 0o644, ctdT2, "new"),
		tDir("f2d", 0o755, ctdT2),
		tFile("f2d/inside", 0o644, ctdT2, "inside"),
		tFile("d2f", 0o600, ctdT2, "a directory, then a file"),
		// Directories written into without their own entry.
		tWhiteout("hw/.wh.a", ctdT2),
		tFile("priv/b", 0o600, ctdT2, "b"),
		tFile("etc/motd", 0o644, ctdT2, "hello"),
	}
	if full {
		l2 = append(l2,
			tHardlink("hl/link", "hl/lower", ctdT2),
			tFile("lib/through", 0o644, ctdT2, "lands in usr/lib"),
		)
	}
	future := tFile("time/future", 0o644, ctdT3, "2100")
	future.hdr.ModTime = time.Date(2100, 1, 1, 12, 0, 0, 500000000, time.UTC)
	l3 := []tarEntry{
		tFile("wh/file1", 0o640, ctdT3, "back again"), // whited out by layer 2
		tDir("time", 0o755, ctdT3),
		future,
	}
	if full {
		old := tFile("time/old", 0o644, ctdT3, "1969")
		old.hdr.ModTime = time.Unix(-86400*365, 0)
		l3 = append(l3, old)
	}
	l3 = append(l3,
		tDir("names", 0o755, ctdT3),
		tFile("names/with space", 0o644, ctdT3, "space"),
		tFile("names/new\nline", 0o644, ctdT3, "newline"),
		tFile("names/\xff\xfe", 0o644, ctdT3, "not utf-8"),
		tFile("names/ünïcödé", 0o644, ctdT3, "utf-8"),
	)
	return testimage.Image{
		Layers: []testimage.Layer{
			{Tar: layerTar(t, l1...), Compression: testimage.Gzip},
			{Tar: layerTar(t, l2...), Compression: testimage.Zstd},
			{Tar: layerTar(t, l3...), Compression: testimage.None},
		},
		Config: v1.Config{Cmd: []string{"/bin/sh"}},
	}
}

// ctdWalkingMtimes are the directories whose mtime containerd's walking
// differ does not keep, for any snapshotter: the root (it ignores a
// layer's entry for it, the root of the upper directory is as the
// snapshotter made it) and, in ctdEdgeImage, the directories a layer
// writes into without an entry of its own (it creates them in the layer's
// upper directory with the lower one's metadata, but adding the child
// changes the mtime; kiln's differ keeps the lower directory as it is).
func ctdWalkingMtimes(edge bool) map[string]string {
	m := map[string]string{"/": "the root directory"}
	if edge {
		for _, d := range []string{"/hw", "/priv", "/etc", "/wh"} {
			m[d] = "a directory a layer writes into without an entry of its own"
		}
	}
	return m
}

// TestContainerdPullE2fsprogsWriter pulls the edge-case image into kiln
// serve configured with the e2fsprogs writer: the export is what kiln
// convert --writer e2fsprogs gives, byte for byte.
func TestContainerdPullE2fsprogsWriter(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	ref := mustPush(t, "ctd-edge-e2fsprogs:v1", mustBuild(t, ctdEdgeImage(t, true)))
	e := startContainerd(t, testcontainerd.Options{Writer: "e2fsprogs"})
	dir := t.TempDir()
	want := filepath.Join(dir, "convert.ext4")
	convert(t, ref, want, filepath.Join(dir, "cache"), "--writer", "e2fsprogs")
	if out, err := ctrRun(t, e, ctdPullArgs("e2fsprogs", ref, false)...); err != nil {
		t.Fatalf("pull: %v\n%s", err, ctdTail(out, 4000))
	}
	out := filepath.Join(dir, "export.ext4")
	ctdExport(t, e, "e2fsprogs", ref, out)
	fsck(t, out)
	if got, w := fileSHA(t, out), fileSHA(t, want); got != w {
		t.Errorf("kiln export with the e2fsprogs writer: sha256 %s, kiln convert --writer e2fsprogs: %s", got, w)
	}
}

// TestContainerdPull pulls the minbase image and the edge-case image into
// the kiln snapshotter through containerd's transfer service, with
// client-side unpacking (--local), and with containerd's walking differ
// instead of kiln's. kiln export must give exactly the bytes kiln convert
// gives for the same reference with kiln's differ, and the same tree with
// the walking differ. Layer blobs are fetched by containerd only. kiln
// serve is restarted between a pull and the export.
func TestContainerdPull(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	images := []struct {
		name string
		ref  string
		img  v1.Image
	}{
		{name: "minbase", ref: minbaseRef(t), img: minbase.img},
	}
	for _, cross := range []bool{true, false} {
		img := mustBuild(t, ctdEdgeImage(t, cross))
		tag := "ctd-edge:v1"
		name := "edge"
		if !cross {
			tag, name = "ctd-edge-walkable:v1", "edge-walkable"
		}
		images = append(images, struct {
			name string
			ref  string
			img  v1.Image
		}{name, mustPush(t, tag, img), img})
	}
	kilnDiffer := startContainerd(t, testcontainerd.Options{DiffService: true})
	walking := startContainerd(t, testcontainerd.Options{WalkingDiffer: true})
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")

	// The registry's log of blob GETs while the pulls ran.
	var pullFetches []testregistry.Request
	pulled := map[string]bool{} // images by name
	pullAndLog := func(t *testing.T, e *testcontainerd.Env, args ...string) (string, error) {
		t.Helper()
		n := len(reg.Requests())
		out, err := ctrRun(t, e, args...)
		for _, q := range reg.Requests()[n:] {
			if q.Method == "GET" && strings.Contains(q.Path, "/blobs/") {
				pullFetches = append(pullFetches, q)
			}
		}
		return out, err
	}

	for _, im := range images {
		t.Run(im.name, func(t *testing.T) {
			pulled[im.name] = true
			// kiln convert of the same reference, default options.
			want := filepath.Join(dir, im.name+"-convert.ext4")
			convert(t, im.ref, want, cache)
			wantSHA := fileSHA(t, want)
			exports := map[string]string{}

			for _, mode := range []string{"transfer", "local"} {
				t.Run(mode, func(t *testing.T) {
					ns := im.name + "-" + mode
					if out, err := pullAndLog(t, kilnDiffer, ctdPullArgs(ns, im.ref, mode == "local")...); err != nil {
						t.Fatalf("pull: %v\n%s", err, ctdTail(out, 4000))
					}
					if mode == "transfer" {
						// The image may be building in the background:
						// kiln must pick up from its state after a restart.
						if err := kilnDiffer.StopKiln(); err != nil {
							t.Errorf("kiln serve did not stop cleanly on SIGTERM: %v", err)
						}
						if err := kilnDiffer.StartKiln(); err != nil {
							t.Fatal(err)
						}
					}
					out := filepath.Join(dir, ns+".ext4")
					ctdExport(t, kilnDiffer, ns, im.ref, out)
					fsck(t, out)
					if got := fileSHA(t, out); got != wantSHA {
						t.Errorf("kiln export after a %s pull: sha256 %s, kiln convert: %s", mode, got, wantSHA)
					}
					exports[mode] = out
					ctdCheckLeftovers(t, kilnDiffer, ns)
				})
			}

			t.Run("walking", func(t *testing.T) {
				ns := im.name + "-walking"
				out, err := pullAndLog(t, walking, ctdPullArgs(ns, im.ref, false)...)
				if im.name == "edge" {
					// The hard link to a lower layer's file: containerd's
					// walking differ fails on it, for its own overlayfs
					// snapshotter just the same.
					if err == nil {
						t.Fatalf("pulling the image with a cross-layer hard link with containerd's walking differ worked:\n%s", ctdTail(out, 2000))
					}
					t.Logf("kiln: %s", ctdLastLine(out))
					ovl := ctrFails(t, walking, "-n", ns+"-overlayfs", "image", "pull", "--snapshotter", "overlayfs", im.ref)
					// "... to SNAPSHOTTER as "extract-... CHAIN": REASON",
					// with the snapshots' upper directories in REASON.
					upper := regexp.MustCompile(`/\S+/snapshots/[0-9]+/fs/`)
					reason := func(s string) string { return upper.ReplaceAllString(ctdAfter(ctdLastLine(s), `": `), "UPPER/") }
					a, b := reason(out), reason(ovl)
					if a != b || !strings.Contains(a, "hl/link") {
						t.Errorf("kiln and overlayfs fail differently, or not on the hard link:\nkiln:      %s\noverlayfs: %s", a, b)
					}
					ctdCheckLeftovers(t, walking, ns)
					return
				}
				if err != nil {
					t.Fatalf("pull: %v\n%s", err, ctdTail(out, 4000))
				}
				got := filepath.Join(dir, ns+".ext4")
				ctdExport(t, walking, ns, im.ref, got)
				fsck(t, got)
				ref := exports["transfer"]
				if ref == "" {
					ref = want // the same bytes, as the transfer subtest shows
				}
				ctdCompareTrees(t, ctdInspect(t, got), ctdInspect(t, ref), ctdWalkingMtimes(strings.HasPrefix(im.name, "edge")))
				ctdCheckLeftovers(t, walking, ns)
			})
		})
	}

	t.Run("fetches", func(t *testing.T) {
		// kiln serve reads layers from containerd's content store: every
		// blob GET of the pulls is containerd's, and it got every layer.
		byContainerd := map[string]bool{}
		for _, q := range pullFetches {
			if !strings.HasPrefix(q.UserAgent, "containerd/") || strings.Contains(strings.ToLower(q.UserAgent), "kiln") {
				t.Errorf("blob GET during a pull not by containerd: %s (user agent %q)", q.Path, q.UserAgent)
				continue
			}
			byContainerd[q.Path[strings.LastIndex(q.Path, "/")+1:]] = true
		}
		if len(pulled) == 0 {
			t.Skip("no pull ran")
		}
		for _, im := range images {
			if !pulled[im.name] {
				continue
			}
			for _, d := range layerDigests(t, im.img) {
				if !byContainerd[d] {
					t.Errorf("%s: layer blob %s was not fetched by containerd during the pulls", im.name, d)
				}
			}
		}
		t.Logf("%d blob GETs during the pulls, all by containerd (%q)", len(pullFetches), pullFetches[0].UserAgent)
	})
}

func ctdLastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func ctdAfter(s, sep string) string {
	if i := strings.Index(s, sep); i >= 0 {
		return s[i:]
	}
	return s
}

func ctdInspect(t *testing.T, image string) *ext4inspect.FS {
	t.Helper()
	start := time.Now()
	fs, err := ext4inspect.Inspect(context.Background(), image, ext4inspect.Options{})
	if err != nil {
		t.Fatalf("inspecting %s: %v", image, err)
	}
	t.Logf("inspected %s: %d entries in %v", filepath.Base(image), len(fs.Entries), time.Since(start).Round(time.Millisecond))
	return fs
}

// ctdCompareTrees compares two images entry by entry: the same paths, and
// for each the same type, mode, owner, mtime (but for the paths in
// skipMtime, which maps them to the reason), xattrs, link count, content,
// symlink target, device numbers, and the same sharing of inodes between
// names.
func ctdCompareTrees(t *testing.T, got, want *ext4inspect.FS, skipMtime map[string]string) {
	t.Helper()
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	for _, p := range want.Paths() {
		w, g := want.Entries[p], got.Entries[p]
		if g == nil {
			bad("%q: missing", p)
			continue
		}
		if g.Type != w.Type {
			bad("%q: type %s, want %s", p, g.Type, w.Type)
			continue
		}
		if g.Mode != w.Mode || g.UID != w.UID || g.GID != w.GID {
			bad("%q: mode %04o owner %d:%d, want %04o %d:%d", p, g.Mode, g.UID, g.GID, w.Mode, w.UID, w.GID)
		}
		if !g.Mtime.Equal(w.Mtime) {
			if why, ok := skipMtime[p]; ok {
				t.Logf("%q: mtime %v, reference %v: not compared (%s)", p, g.Mtime.UTC(), w.Mtime.UTC(), why)
			} else {
				bad("%q: mtime %v, want %v", p, g.Mtime.UTC(), w.Mtime.UTC())
			}
		}
		if !ctdXattrsEqual(g.Xattrs, w.Xattrs) {
			bad("%q: xattrs %q, want %q", p, g.Xattrs, w.Xattrs)
		}
		if g.Links != w.Links {
			bad("%q: %d links, want %d", p, g.Links, w.Links)
		}
		if g.Target != w.Target {
			bad("%q: target %.80q, want %.80q", p, g.Target, w.Target)
		}
		if g.Major != w.Major || g.Minor != w.Minor {
			bad("%q: device %d:%d, want %d:%d", p, g.Major, g.Minor, w.Major, w.Minor)
		}
		if w.Type == ext4inspect.Regular && (g.SHA256 != w.SHA256 || g.Size != w.Size) {
			bad("%q: content differs (%d bytes, want %d)", p, g.Size, w.Size)
		}
		if w.Type != ext4inspect.Dir && w.Links > 1 && !slices.Equal(got.Names(g.Ino), want.Names(w.Ino)) {
			bad("%q: names of the inode %q, want %q", p, got.Names(g.Ino), want.Names(w.Ino))
		}
	}
	for _, p := range got.Paths() {
		if want.Entries[p] == nil {
			bad("%q: not in the reference image", p)
		}
	}
	for i, p := range problems {
		if i == 40 {
			t.Errorf("... and %d more", len(problems)-40)
			break
		}
		t.Error(p)
	}
	if len(problems) == 0 {
		t.Logf("compared %d entries: the same", len(want.Entries))
	}
}

func ctdXattrsEqual(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// ctdCheckLeftovers fails the test if containerd lists an active
// snapshot of kiln's in namespace ns, if a directory under kiln's
// snapshots is a half-stored layer or a removal left behind, or if kiln's
// work directory is not empty. containerd removes what a failed pull
// prepared in its garbage collection, after the pull returns: the check
// waits for it a while.
func ctdCheckLeftovers(t *testing.T, e *testcontainerd.Env, ns string) {
	t.Helper()
	ctdEventually(t, "leftovers of extractions", func() []string {
		var problems []string
		out, err := e.Ctr(context.Background(), "-n", ns, "snapshots", "--snapshotter", "kiln", "ls")
		if err != nil {
			return []string{fmt.Sprintf("ctr snapshots ls: %v: %s", err, out)}
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "extract-") || strings.Contains(l, "Active") {
				problems = append(problems, fmt.Sprintf("snapshot left in namespace %s: %s", ns, l))
			}
		}
		ents, err := os.ReadDir(filepath.Join(e.KilnRoot, "snapshots"))
		if err != nil {
			return []string{err.Error()}
		}
		for _, d := range ents {
			sd := filepath.Join(e.KilnRoot, "snapshots", d.Name())
			if strings.HasPrefix(d.Name(), "rm-") {
				problems = append(problems, sd+": a removed snapshot's files are still there")
			}
			if ctdExists(filepath.Join(sd, "layer")) && !ctdLayerStored(sd) && ctdEmptyDir(filepath.Join(sd, "fs")) {
				// Neither stored by kiln's differ nor filled by the
				// walking differ: an extraction that failed.
				problems = append(problems, sd+": an extraction snapshot with no layer")
			}
			if ms, _ := filepath.Glob(filepath.Join(sd, "*.tmp")); len(ms) > 0 {
				problems = append(problems, fmt.Sprintf("%s: temporary files left: %v", sd, ms))
			}
		}
		if ents, _ := os.ReadDir(filepath.Join(e.KilnRoot, "tmp")); len(ents) > 0 {
			var names []string
			for _, d := range ents {
				names = append(names, d.Name())
			}
			problems = append(problems, fmt.Sprintf("kiln's work directory is not empty: %v", names))
		}
		return problems
	})
}

// ctdEventually calls check until it reports no problem, for up to 20
// seconds, and fails the test with the last problems if it keeps
// reporting some: containerd removes snapshots from kiln in its garbage
// collection, which runs after the call that dropped them returns.
func ctdEventually(t *testing.T, what string, check func() []string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		problems := check()
		if len(problems) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s:\n%s", what, strings.Join(problems, "\n"))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ctdExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// ctdLayerStored says whether kiln's differ stored a layer in snapshot
// directory dir: as a record and its data, or as a tar (earlier kilns).
func ctdLayerStored(dir string) bool {
	return ctdExists(filepath.Join(dir, "layer.record")) || ctdExists(filepath.Join(dir, "layer.tar"))
}

func ctdEmptyDir(p string) bool {
	ents, err := os.ReadDir(p)
	return err == nil && len(ents) == 0
}

// ctdMountCommand asks ctr for the mount command of snapshot key onto target
// and returns it.
func ctdMountCommand(t *testing.T, e *testcontainerd.Env, ns, key, target string) string {
	t.Helper()
	out := strings.TrimSpace(ctr(t, e, "-n", ns, "snapshots", "--snapshotter", "kiln", "mounts", target, key))
	lines := strings.Split(out, "\n")
	cmd := strings.TrimSpace(lines[len(lines)-1])
	if len(lines) != 1 || !strings.HasPrefix(cmd, "mount -t ext4 ") || !strings.Contains(cmd, " "+target+" ") {
		t.Fatalf("ctr snapshots mounts %s: want one ext4 mount command onto %s, got:\n%s", key, target, out)
	}
	return cmd
}

// ctdMount runs the mount command ctr prints for key on a new
// directory, exactly as printed, and returns the directory; it is
// unmounted when the test ends unless unmounted before.
func ctdMount(t *testing.T, e *testcontainerd.Env, ns, key string) (string, string) {
	t.Helper()
	target := t.TempDir()
	cmd := ctdMountCommand(t, e, ns, key, target)
	if out, err := exec.Command("sh", "-c", cmd).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	t.Logf("mounted %s: %s", key, cmd)
	t.Cleanup(func() { ctdUnmount(t, target) })
	return target, cmd
}

func ctdUnmount(t *testing.T, target string) {
	t.Helper()
	if !ctdIsMountPoint(target) {
		return
	}
	if out, err := exec.Command("umount", target).CombinedOutput(); err != nil {
		t.Errorf("umount %s: %v\n%s", target, err, out)
	}
}

func ctdIsMountPoint(dir string) bool {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// TestContainerdContainers: containers (active snapshots) on a pulled
// image, in both container modes, mount through containerd's mount
// manager as containerd mounts them for a task, are private to each other
// and to the image, and everything of the image goes when it and they
// are removed.
func TestContainerdContainers(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root and mount ext4 files")
	ref := minbaseRef(t)
	chain := ctdChainID(t, minbase.img)
	e := startContainerd(t, testcontainerd.Options{Metrics: true})
	const ns = "containers"
	ctr(t, e, ctdPullArgs(ns, ref, false)...)
	dir := t.TempDir()
	before := filepath.Join(dir, "before.ext4")
	ctdExport(t, e, ns, ref, before)
	beforeSHA := fileSHA(t, before)
	sn := []string{"-n", ns, "snapshots", "--snapshotter", "kiln"}

	// Snapshots made with ctr belong to no lease: a gc.root label keeps
	// containerd's garbage collection off them.
	keep := func(key string) { ctr(t, e, append(sn, "label", key, "containerd.io/gc.root=kiln-test")...) }
	ctr(t, e, append(sn, "prepare", "c1", chain)...)
	keep("c1")
	ctdPrepare(t, e, ns, "c2", chain, map[string]string{"containerd.io/snapshot/kiln.container-mode": "copy"})
	ctr(t, e, append(sn, "view", "v1", chain)...)
	keep("v1")

	// The forms: overlay mode by default, copy mode by label.
	m1, m2 := ctdMounts(t, e, ns, "c1"), ctdMounts(t, e, ns, "c2")
	if len(m1) != 3 || m1[0].Type != "format/ext4" || !strings.HasSuffix(m1[0].Source, "/scratch.ext4") ||
		m1[1].Type != "ext4" || !strings.HasSuffix(m1[1].Source, "/disk.ext4") || m1[2].Type != "format/mkdir/overlay" {
		t.Errorf("overlay-mode container mounts: %+v", m1)
	}
	if len(m2) != 1 || m2[0].Type != "format/ext4" || !strings.HasSuffix(m2[0].Source, "/container.ext4") {
		t.Errorf("copy-mode container mounts: %+v", m2)
	}

	// A view mounts with exactly the command ctr prints.
	vmnt, cmd := ctdMount(t, e, ns, "v1")
	if !regexp.MustCompile(`^mount -t ext4 \S+/disk\.ext4 \S+ -o (\S+,)?loop(,\S+)?$`).MatchString(cmd) || !strings.Contains(cmd, "ro") {
		t.Errorf("view mount command %q: want a read-only loop mount of the image's disk.ext4", cmd)
	}
	if _, err := os.Stat(filepath.Join(vmnt, "etc/os-release")); err != nil {
		t.Error(err)
	}
	ctdUnmount(t, vmnt)

	var secrets [2][]byte
	for i, key := range []string{"c1", "c2"} {
		mnt, unmount := ctdMountSnapshot(t, e, ns, key)
		osRelease, err := os.ReadFile(filepath.Join(mnt, "etc/os-release"))
		if err != nil {
			t.Fatalf("reading %s's /etc/os-release: %v", key, err)
		}
		ctdAssertContains(t, "/etc/os-release", string(osRelease), "Debian", "bookworm")
		secrets[i] = make([]byte, 16)
		rand.Read(secrets[i]) //nolint:errcheck // never fails
		if err := os.WriteFile(filepath.Join(mnt, "root/"+key+"-only"), secrets[i], 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(filepath.Join(mnt, "etc/hostname")); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		unmount()
	}

	// Each container and the view see nothing of the others; each
	// container kept its own change.
	for i, key := range []string{"c1", "c2", "v1"} {
		mnt, unmount := ctdMountSnapshot(t, e, ns, key)
		for j, other := range []string{"c1", "c2"} {
			b, err := os.ReadFile(filepath.Join(mnt, "root/"+other+"-only"))
			switch {
			case i == j && (err != nil || !bytes.Equal(b, secrets[j])):
				t.Errorf("%s lost its file: %v", key, err)
			case i != j && !errors.Is(err, os.ErrNotExist):
				t.Errorf("%s sees %s's file (err %v)", key, other, err)
			}
		}
		if key == "v1" {
			if err := os.WriteFile(filepath.Join(mnt, "x"), nil, 0o600); err == nil {
				t.Errorf("a view is writable")
			}
		}
		unmount()
	}

	// What an operator watches.
	metrics := ctdMetrics(t, e)
	for _, want := range []string{
		`kiln_containers{mode="overlay"} 1`,
		`kiln_containers{mode="copy"} 1`,
		`kiln_grpc_request_seconds_count{code="OK",method="/containerd.services.snapshots.v1.Snapshots/Prepare"}`,
		`kiln_disk_build_wait_seconds_count{class=`,
		`kiln_disk_build_queue{class="urgent"} 0`,
		`kiln_loop_devices 0`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	for _, kind := range []string{"layers", "disks", "containers"} {
		if !regexp.MustCompile(`kiln_disk_bytes\{kind="` + kind + `"\} [1-9]`).MatchString(metrics) {
			t.Errorf("metrics: no disk used by %s", kind)
		}
	}

	after := filepath.Join(dir, "after.ext4")
	ctdExport(t, e, ns, ref, after)
	if got := fileSHA(t, after); got != beforeSHA {
		t.Errorf("the image changed: export sha256 %s before the containers, %s after", beforeSHA, got)
	}
	if out := ctr(t, e, append(sn, "usage", "c1")...); !strings.Contains(out, "c1") {
		t.Errorf("ctr snapshots usage c1:\n%s", out)
	}

	// Remove the containers and the image: nothing of it may remain.
	ctr(t, e, append(sn, "rm", "c1", "c2", "v1")...)
	ctr(t, e, "-n", ns, "image", "rm", "--sync", ref)
	ctdEventually(t, "after removing the image and its containers, kiln still holds", func() []string {
		return ctdKilnFiles(t, e.KilnRoot)
	})
	if out := ctr(t, e, append(sn, "ls")...); strings.Count(strings.TrimSpace(out), "\n") > 0 {
		t.Errorf("snapshots left:\n%s", out)
	}
	if devs := testcontainerd.LoopDevices(e.KilnRoot); len(devs) > 0 {
		t.Errorf("loop devices still attached to kiln's files: %v", devs)
	}
}

// ctdMetrics returns what kiln serves on /metrics.
func ctdMetrics(t *testing.T, e *testcontainerd.Env) string {
	t.Helper()
	resp, err := http.Get("http://" + e.MetricsAddress + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %s, %v", resp.Status, err)
	}
	return string(b)
}

// ctdCollectGarbage runs containerd's garbage collection now, as a
// synchronous lease deletion does, rather than when containerd's
// scheduler gets to it.
func ctdCollectGarbage(t testing.TB, e *testcontainerd.Env, ns string) {
	t.Helper()
	client, ctx := ctdClient(t, e, ns)
	ls := client.LeasesService()
	l, err := ls.Create(ctx, leases.WithRandomID())
	if err != nil {
		t.Fatal(err)
	}
	if err := ls.Delete(ctx, l, leases.SynchronousDelete); err != nil {
		t.Fatal(err)
	}
}

// ctdClient connects to containerd for namespace ns; the client is closed
// when the test ends.
func ctdClient(t testing.TB, e *testcontainerd.Env, ns string) (*containerd.Client, context.Context) {
	t.Helper()
	client, err := containerd.New(e.Address, containerd.WithDefaultNamespace(ns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, namespaces.WithNamespace(context.Background(), ns)
}

// ctdMounts returns a snapshot's mounts as kiln hands them to containerd.
func ctdMounts(t *testing.T, e *testcontainerd.Env, ns, key string) []mount.Mount {
	t.Helper()
	client, ctx := ctdClient(t, e, ns)
	mounts, err := client.SnapshotService("kiln").Mounts(ctx, key)
	if err != nil {
		t.Fatalf("mounts of %s: %v", key, err)
	}
	return mounts
}

// ctdMountSnapshot mounts a snapshot on a new directory the way containerd
// mounts a container's root for a task: through a mount manager, which
// mounts the disks and assembles the overlay. It returns the directory and
// what unmounts it, which runs when the test ends if not before.
func ctdMountSnapshot(t *testing.T, e *testcontainerd.Env, ns, key string) (string, func()) {
	t.Helper()
	mounts := ctdMounts(t, e, ns, key)
	state := t.TempDir()
	db, err := bolt.Open(filepath.Join(state, "mounts.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	mm, err := manager.NewManager(db, filepath.Join(state, "t"), manager.WithAllowedRoot(e.KilnRoot))
	if err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(context.Background(), ns)
	system := mounts
	if ai, err := mm.Activate(ctx, key, mounts); err == nil {
		system = ai.System
	} else if !errdefs.IsNotImplemented(err) {
		t.Fatalf("activating %s's mounts %+v: %v", key, mounts, err)
	}
	target := t.TempDir()
	if err := mount.All(system, target); err != nil {
		t.Fatalf("mounting %s (%+v): %v", key, system, err)
	}
	done := false
	unmount := func() {
		if done {
			return
		}
		done = true
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmounting %s: %v", key, err)
		}
		if err := mm.Deactivate(ctx, key); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("deactivating %s: %v", key, err)
		}
		mm.(io.Closer).Close()
	}
	t.Cleanup(unmount)
	return target, unmount
}

// ctdKilnFiles lists the snapshot directories under kiln's root and the
// layers and images in them.
func ctdKilnFiles(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	base := filepath.Join(root, "snapshots")
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(base, p)
		switch {
		case rel == ".":
		case !strings.Contains(rel, "/"):
			out = append(out, rel+"/")
		case d.Name() == "layer.tar" || d.Name() == "layer.record" || strings.HasSuffix(d.Name(), ".ext4"):
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// ctdSmallImage is a one-layer image with a file.
func ctdSmallImage(t *testing.T, content string) v1.Image {
	return mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t,
		tDir("etc", 0o755, ctdT1),
		tFile("etc/small", 0o644, ctdT1, content),
	)}}})
}

// TestContainerdBlockDevices: in block-device mode a view's mount is an
// attached loop device, detached when the view is removed; after kiln is
// killed, the next kiln detaches the devices it attached but never
// recorded, keeps the live ones (a removal that did not commit included),
// and leaves alone a device it did not attach.
func TestContainerdBlockDevices(t *testing.T) {
	needRoot(t, "loop devices")
	img := ctdSmallImage(t, "block devices")
	ref := mustPush(t, "ctd-block:v1", img)
	chain := ctdChainID(t, img)
	e := startContainerd(t, testcontainerd.Options{BlockDevices: true})
	const ns = "block"
	sn := []string{"-n", ns, "snapshots", "--snapshotter", "kiln"}
	ctr(t, e, ctdPullArgs(ns, ref, false)...)

	// kiln export copies the file behind the view's device.
	dir := t.TempDir()
	exported, converted := filepath.Join(dir, "export.ext4"), filepath.Join(dir, "convert.ext4")
	ctdExport(t, e, ns, ref, exported)
	convert(t, ref, converted, filepath.Join(dir, "cache"))
	if a, b := fileSHA(t, exported), fileSHA(t, converted); a != b {
		t.Errorf("kiln export in block-device mode: sha256 %s, kiln convert: %s", a, b)
	}

	// view returns the device of a new view and checks it holds the image.
	view := func(key string) string {
		t.Helper()
		ctr(t, e, append(sn, "view", key, chain)...)
		// Out of reach of containerd's garbage collection.
		ctr(t, e, append(sn, "label", key, "containerd.io/gc.root=kiln-test")...)
		return ctdViewDevice(t, e, ns, key)
	}
	// The device goes with the view.
	dev1 := view("v1")
	ctr(t, e, append(sn, "rm", "v1")...)
	ctdEventually(t, "after removing the view", func() []string {
		if f, ok := testcontainerd.LoopDevices(e.KilnRoot)[dev1]; ok {
			return []string{fmt.Sprintf("%s still attached to %s", dev1, f)}
		}
		return nil
	})

	// A container's devices: its scratch, writable, and the image's disk.
	ctr(t, e, append(sn, "prepare", "c1", chain)...)
	ctr(t, e, append(sn, "label", "c1", "containerd.io/gc.root=kiln-test")...)
	cm := ctdMounts(t, e, ns, "c1")
	if len(cm) != 3 || !strings.HasPrefix(cm[0].Source, "/dev/loop") || !strings.HasPrefix(cm[1].Source, "/dev/loop") ||
		!strings.HasSuffix(testcontainerd.LoopDevices(e.KilnRoot)[cm[0].Source], "/scratch.ext4") {
		t.Errorf("container mounts in block-device mode: %+v", cm)
	}
	mnt, unmount := ctdMountSnapshot(t, e, ns, "c1")
	if b, err := os.ReadFile(filepath.Join(mnt, "etc/small")); err != nil || string(b) != "block devices" {
		t.Errorf("the container's /etc/small: %q, %v", b, err)
	}
	unmount()

	// A live view, one that kiln was removing when it died (before the
	// removal was recorded), one whose record kiln never wrote, and a
	// device somebody else attached to kiln's disk.
	live := view("live")
	dying := view("dying")
	unrecorded := view("unrecorded")
	e.KillKiln()
	recordOf := func(dev string) string {
		files, _ := filepath.Glob(filepath.Join(e.KilnRoot, "snapshots", "*", "loop.*"))
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == dev {
				return f
			}
		}
		t.Fatalf("no snapshot directory of kiln's records %s", dev)
		return ""
	}
	// Removing renames the directory before it detaches the device.
	dyingDir := filepath.Dir(recordOf(dying))
	if err := os.Rename(dyingDir, filepath.Join(filepath.Dir(dyingDir), "rm-"+filepath.Base(dyingDir))); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(recordOf(unrecorded)); err != nil {
		t.Fatal(err)
	}
	disk := testcontainerd.LoopDevices(e.KilnRoot)[live]
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", disk).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v\n%s", err, out)
	}
	theirs := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", theirs).Run() }) //nolint:errcheck // best effort

	if err := e.StartKiln(); err != nil {
		t.Fatal(err)
	}
	devs := testcontainerd.LoopDevices(e.KilnRoot)
	if f, ok := devs[unrecorded]; ok {
		t.Errorf("stale %s (backed by %s) still attached after kiln's restart", unrecorded, f)
	}
	for _, d := range []string{live, dying} {
		if devs[d] != disk {
			t.Errorf("the view's %s lost its disk after kiln's restart (backed by %q)", d, devs[d])
		}
	}
	if !ctdExists(dyingDir) {
		t.Errorf("the half-removed view's directory was not put back")
	}
	if devs[theirs] != disk {
		t.Errorf("kiln detached %s, which it did not attach", theirs)
	}
	if again := ctdViewDevice(t, e, ns, "live"); again != live {
		t.Errorf("after kiln's restart the live view mounts %s, was %s", again, live)
	}
	exec.Command("losetup", "-d", theirs).Run() //nolint:errcheck // checked below
	ctr(t, e, append(sn, "rm", "live", "dying", "unrecorded", "c1")...)
	ctr(t, e, "-n", ns, "image", "rm", "--sync", ref)
	ctdEventually(t, "after removing the views and the image", func() []string {
		var problems []string
		for d, f := range testcontainerd.LoopDevices(e.KilnRoot) {
			problems = append(problems, fmt.Sprintf("%s still attached to %s", d, f))
		}
		return append(problems, ctdKilnFiles(t, e.KilnRoot)...)
	})
}

// ctdViewDevice checks that a view is a read-only loop device holding the
// small image, and returns the device.
func ctdViewDevice(t *testing.T, e *testcontainerd.Env, ns, key string) string {
	t.Helper()
	m := ctdMounts(t, e, ns, key)
	if len(m) != 1 || m[0].Type != "ext4" || !strings.HasPrefix(m[0].Source, "/dev/loop") || !slices.Contains(m[0].Options, "ro") {
		t.Fatalf("%s: want a read-only mount of a loop device, got %+v", key, m)
	}
	if f := testcontainerd.LoopDevices(e.KilnRoot)[m[0].Source]; !strings.HasSuffix(f, "/disk.ext4") {
		t.Fatalf("%s is backed by %q, want an image's disk.ext4 under kiln's root", m[0].Source, f)
	}
	mnt, unmount := ctdMountSnapshot(t, e, ns, key)
	if b, err := os.ReadFile(filepath.Join(mnt, "etc/small")); err != nil || string(b) != "block devices" {
		t.Errorf("%s: /etc/small: %q, %v", key, b, err)
	}
	unmount()
	return m[0].Source
}

// TestContainerdBadInput: layers that cannot be stored fail the pull with
// kiln's reason at containerd's side, leave no partial snapshot, and kiln
// keeps serving; requests for what does not exist get NotFound. Client
// side pulls (--local) use kiln's differ through the diff service.
func TestContainerdBadInput(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	e := startContainerd(t, testcontainerd.Options{DiffService: true})
	good := ctdSmallImage(t, "good layer")
	goodLayer := layerTar(t, tDir("ok", 0o755, ctdT1), tFile("ok/file", 0o644, ctdT1, "fine"))

	t.Run("escaping-entry", func(t *testing.T) {
		evil := layerTar(t, tFile("../evil", 0o644, ctdT1, "outside"))
		img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: goodLayer}, {Tar: evil}}})
		ref := mustPush(t, "ctd-evil:v1", img)
		bad := layerDigests(t, img)[1]
		for _, local := range []bool{false, true} {
			ns := fmt.Sprintf("evil-%v", local)
			out := ctrFails(t, e, ctdPullArgs(ns, ref, local)...)
			ctdAssertContains(t, "the pull's error", out, fmt.Sprintf("layer %s: entry %q", bad, "../evil"))
			ctdCheckLeftovers(t, e, ns)
			// The good first layer was committed, but no image holds
			// it: containerd's garbage collection removes it too.
			ctdEventually(t, "snapshots of the failed pull", func() []string {
				ctdCollectGarbage(t, e, ns) // now, not on containerd's schedule
				ls, _ := e.Ctr(context.Background(), "-n", ns, "snapshots", "--snapshotter", "kiln", "ls")
				if lines := strings.Split(strings.TrimSpace(ls), "\n"); len(lines) > 1 {
					return lines[1:]
				}
				return nil
			})
		}
	})

	t.Run("corrupt-gzip", func(t *testing.T) {
		// A gzip header, then garbage.
		junk := make([]byte, 4096)
		rand.Read(junk) //nolint:errcheck // never fails
		copy(junk, []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff})
		layer := static.NewLayer(junk, types.OCILayer)
		img, err := mutate.AppendLayers(mustBuild(t, testimage.Image{}), layer)
		if err != nil {
			t.Fatal(err)
		}
		ref := mustPush(t, "ctd-junk:v1", img)
		d, _ := layer.Digest()
		out := ctrFails(t, e, ctdPullArgs("junk", ref, false)...)
		ctdAssertContains(t, "the pull's error", out, "layer "+d.String()+": ")
		ctdCheckLeftovers(t, e, "junk")
	})

	t.Run("wrong-diffid", func(t *testing.T) {
		img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: goodLayer}}})
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		cf = cf.DeepCopy()
		wrong := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
		cf.RootFS.DiffIDs[0] = wrong
		img, err = mutate.ConfigFile(img, cf)
		if err != nil {
			t.Fatal(err)
		}
		ref := mustPush(t, "ctd-diffid:v1", img)
		for _, local := range []bool{false, true} {
			ns := fmt.Sprintf("diffid-%v", local)
			out := ctrFails(t, e, ctdPullArgs(ns, ref, local)...)
			ctdAssertContains(t, "the pull's error", out, "diff")
			ctdCheckLeftovers(t, e, ns)
		}
	})

	t.Run("blob-mismatch", func(t *testing.T) {
		// The registry serves other bytes (of the same length) than the
		// manifest's digest: containerd refuses them before kiln sees
		// anything.
		img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{{Tar: layerTar(t, tFile("m", 0o644, ctdT1, "mismatch"))}}})
		ref := mustPush(t, "ctd-mismatch:v1", img)
		ls, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		rc, err := ls[0].Compressed()
		if err != nil {
			t.Fatal(err)
		}
		var blob bytes.Buffer
		blob.ReadFrom(rc) //nolint:errcheck // in memory
		rc.Close()
		other := blob.Bytes()
		other[len(other)-5] ^= 0xff
		d := layerDigests(t, img)[0]
		reg.ServeBlob(d, other)
		for _, local := range []bool{false, true} {
			ns := fmt.Sprintf("mismatch-%v", local)
			out := ctrFails(t, e, ctdPullArgs(ns, ref, local)...)
			ctdAssertContains(t, "the pull's error", ctdLastLine(out), d)
			ctdCheckLeftovers(t, e, ns)
		}
	})

	t.Run("not-found", func(t *testing.T) {
		for _, ns := range []string{"default", "no-such-namespace"} {
			out := ctrFails(t, e, "-n", ns, "snapshots", "--snapshotter", "kiln", "info", "nope")
			ctdAssertContains(t, "the error", out, "not found")
		}
		// Straight to kiln's socket, past containerd's metadata.
		conn, err := grpc.NewClient("unix://"+e.KilnAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		sn := snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "kiln")
		for _, ns := range []string{"default", "no-such-namespace"} {
			ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 30*time.Second)
			calls := map[string]error{}
			_, calls["stat"] = sn.Stat(ctx, "nope")
			_, calls["mounts"] = sn.Mounts(ctx, "nope")
			calls["remove"] = sn.Remove(ctx, "nope")
			calls["commit"] = sn.Commit(ctx, "name", "nope")
			_, calls["usage"] = sn.Usage(ctx, "nope")
			_, calls["prepare on a missing parent"] = sn.Prepare(ctx, "k", "nope")
			_, calls["view of a missing parent"] = sn.View(ctx, "k", "nope")
			for what, err := range calls {
				if !errdefs.IsNotFound(err) {
					t.Errorf("namespace %s: %s: %v, want NotFound", ns, what, err)
				}
			}
			cancel()
		}
		// A mount that is not kiln's: kiln's differ leaves it to the next.
		d := diffproxy.NewDiffApplier(diffapi.NewDiffClient(conn)).(diff.Applier)
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "no-such-namespace"), 30*time.Second)
		defer cancel()
		blob := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("x"), Size: 1}
		_, err = d.Apply(ctx, blob, []mount.Mount{{Type: "bind", Source: t.TempDir(), Options: []string{"rbind", "rw"}}})
		if !errdefs.IsNotImplemented(err) {
			t.Errorf("applying to a bind mount: %v, want NotImplemented", err)
		}
		// An extraction of kiln's, for a blob containerd does not have,
		// in a namespace it does not know.
		mounts, err := sn.Prepare(ctx, "extract-test sha256:x", "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "sha256:x"}))
		if err != nil {
			t.Fatal(err)
		}
		_, err = d.Apply(ctx, blob, mounts)
		if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), blob.Digest.String()) {
			t.Errorf("applying a blob containerd does not have: %v, want NotFound naming the blob", err)
		}
		if err := sn.Remove(ctx, "extract-test sha256:x"); err != nil {
			t.Error(err)
		}
		// kiln export of an image in a namespace containerd does not know.
		out := filepath.Join(t.TempDir(), "nope.ext4")
		res := kiln(t, run{args: []string{"export", "no-such-image", "-o", out, "--namespace", "no-such-namespace", "--address", e.Address}})
		if res.err == nil {
			t.Errorf("kiln export from a namespace that does not exist worked")
		}
		ctdAssertContains(t, "kiln export's error", res.stderr, "no-such-image", "no-such-namespace", "not found")
		if _, err := os.Lstat(out); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("kiln export left %s (%v)", out, err)
		}
	})

	// kiln survived all of it and serves the next pull.
	if !e.KilnRunning() {
		t.Fatalf("kiln serve exited:\n%s", ctdTail(e.KilnLog(), 4000))
	}
	ref := mustPush(t, "ctd-good:v1", good)
	ctr(t, e, ctdPullArgs("good", ref, false)...)
	out := filepath.Join(t.TempDir(), "good.ext4")
	ctdExport(t, e, "good", ref, out)
	fsck(t, out)
	ctdCheckLeftovers(t, e, "good")
}

// ctdAssertContains checks that text has every one of want.
func ctdAssertContains(t *testing.T, what, text string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("%s does not mention %q:\n%s", what, w, ctdTail(text, 3000))
		}
	}
}
