package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/internal/testenv"
)

// These tests run containers for real on kiln's snapshots: runc through
// containerd (ctr run), the CRI plugin (crictl, with a runtime handler
// whose snapshotter is kiln), and microVMs booted from a container's disks
// under QEMU.

// needRunc skips, with the reason, where runc cannot run containers.
func needRunc(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("runc"); err != nil {
		if _, err := os.Stat("/usr/sbin/runc"); err != nil {
			testenv.Unavailable(t, "runc is not installed (Debian package runc)")
		}
	}
}

// writtenFile reads a file of a container's writable disk with debugfs,
// in userspace: where it is depends on the container mode.
func writtenFile(t *testing.T, mounts []mount.Mount, name string) string {
	t.Helper()
	disk, path := mounts[0].Source, "/upper"+name
	if len(mounts) == 1 {
		path = name
	}
	out, err := exec.Command("debugfs", "-R", "cat "+path, disk).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s in %s: %v", path, disk, err)
	}
	return string(out)
}

// imageDisk returns the disk of an image's top snapshot, from a view.
func imageDisk(t *testing.T, e *testcontainerd.Env, ns string, img v1.Image) string {
	t.Helper()
	client, ctx := ctdClient(t, e, ns)
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer done(context.Background()) //nolint:errcheck // the view goes with the lease
	m, err := client.SnapshotService("kiln").View(ctx, "disk-of-"+ctdChainID(t, img), ctdChainID(t, img))
	if err != nil {
		t.Fatalf("a view of %s: %v", ctdChainID(t, img), err)
	}
	return m[0].Source
}

// ctdPrepare prepares a container snapshot with labels, out of reach of
// containerd's garbage collection.
func ctdPrepare(t *testing.T, e *testcontainerd.Env, ns, key, parent string, labels map[string]string) {
	t.Helper()
	client, ctx := ctdClient(t, e, ns)
	all := map[string]string{"containerd.io/gc.root": "kiln-test"}
	for k, v := range labels {
		all[k] = v
	}
	if _, err := client.SnapshotService("kiln").Prepare(ctx, key, parent, snapshots.WithLabels(all)); err != nil {
		t.Fatalf("prepare %s (labels %v): %v", key, labels, err)
	}
}

// TestContainerdStockInstall installs kiln the way the README says into
// containerd as users run it: `containerd config default` with kiln's
// drop-in in conf.d. Both snapshotters pull; with kiln stopped, and with
// containerd restarted while kiln is down, overlayfs keeps pulling through
// the transfer service and client-side; kiln pulls again once it is back.
func TestContainerdStockInstall(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	ref1 := mustPush(t, "stock/app:v1", ctdSmallImage(t, "stock one"))
	ref2 := mustPush(t, "stock/app:v2", ctdSmallImage(t, "stock two"))
	e := startContainerd(t, testcontainerd.Options{})
	plugins := ctr(t, e, "plugins", "ls")
	for _, want := range [][2]string{{"io.containerd.snapshotter.v1", "kiln"}, {"io.containerd.differ.v1", "kiln-diff"}} {
		found := false
		for _, l := range strings.Split(plugins, "\n") {
			f := strings.Fields(l)
			found = found || len(f) >= 3 && f[0] == want[0] && f[1] == want[1] && f[len(f)-1] == "ok"
		}
		if !found {
			t.Errorf("ctr plugins ls lacks %s %s ok:\n%s", want[0], want[1], plugins)
		}
	}
	ctr(t, e, ctdPullArgs("stock-kiln", ref1, false)...)
	ctr(t, e, "-n", "stock-ovl", "image", "pull", "--snapshotter", "overlayfs", ref1)
	ctr(t, e, "-n", "stock-ovl-local", "image", "pull", "--local", "--snapshotter", "overlayfs", ref1)

	overlayfsPulls := func(step string) {
		t.Helper()
		for _, local := range []bool{false, true} {
			args := []string{"-n", fmt.Sprintf("stock-%s-%v", step, local), "image", "pull", "--snapshotter", "overlayfs"}
			if local {
				args = append(args, "--local")
			}
			ctr(t, e, append(args, ref2)...)
		}
	}
	if err := e.StopKiln(); err != nil {
		t.Fatal(err)
	}
	overlayfsPulls("kiln-down")
	if err := e.StopContainerd(); err != nil {
		t.Fatal(err)
	}
	if err := e.StartContainerd(); err != nil {
		t.Fatalf("containerd does not start while kiln is down: %v", err)
	}
	overlayfsPulls("restarted")
	ctrFails(t, e, ctdPullArgs("stock-kiln-down", ref2, false)...)
	if err := e.StartKiln(); err != nil {
		t.Fatal(err)
	}
	// containerd reconnects within its back-off (a few seconds).
	ctdEventually(t, "pulling into kiln once it is back", func() []string {
		if out, err := e.Ctr(context.Background(), ctdPullArgs("stock-kiln-back", ref2, false)...); err != nil {
			return []string{ctdLastLine(out)}
		}
		return nil
	})
	ctdExport(t, e, "stock-kiln-back", ref2, filepath.Join(t.TempDir(), "back.ext4"))
}

// runImage is busybox with a layer holding /etc/gone, which containers
// delete, and whose Cmd prints what a commit should carry.
func runImage(t *testing.T, marker string) v1.Image {
	t.Helper()
	return busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{"echo " + marker + " $(busybox cat /committed 2>/dev/null || echo none) gone=$(busybox ls /etc/gone 2>/dev/null || echo yes)"},
		Env:        []string{"PATH=/bin"},
	}, testimage.Layer{Tar: layerTar(t, tDir("etc", 0o755, epoch2020), tFile("etc/gone", 0o644, epoch2020, "to delete"))})
}

// TestContainerdRunc: `ctr run` with runc on a kiln snapshot, in every
// container mode: the container writes and deletes files, its own disk
// holds the change, and the image's disk is unchanged.
func TestContainerdRunc(t *testing.T) {
	needRunc(t)
	img := runImage(t, "runc")
	ref := mustPush(t, "runc/app:v1", img)
	e := startContainerd(t, testcontainerd.Options{})
	const ns = "runc"
	ctr(t, e, ctdPullArgs(ns, ref, false)...)
	disk := imageDisk(t, e, ns, img)
	before := fileSHA(t, disk)
	for _, mode := range []string{"overlay", "copy"} {
		t.Run(mode, func(t *testing.T) {
			id := "runc-" + mode
			out := ctr(t, e, "-n", ns, "run", "--runc-root", e.RuncRoot(), "--fifo-dir", e.FIFODir(), "--snapshotter", "kiln",
				"--snapshotter-label", "containerd.io/snapshot/kiln.container-mode="+mode,
				ref, id, "/bin/sh", "-c", "echo written-in-"+mode+" > /written && busybox rm /etc/gone && busybox cat /written")
			ctdAssertContains(t, "ctr run", out, "written-in-"+mode)
			mounts := ctdMounts(t, e, ns, id)
			if want := map[string]int{"overlay": 3, "copy": 1}[mode]; len(mounts) != want {
				t.Fatalf("%s container has %d mounts, want %d", mode, len(mounts), want)
			}
			if got := writtenFile(t, mounts, "/written"); got != "written-in-"+mode+"\n" {
				t.Errorf("the container's disk holds %q in /written", got)
			}
			ctr(t, e, "-n", ns, "container", "rm", id)
		})
	}
	if got := fileSHA(t, disk); got != before {
		t.Errorf("running containers changed the image's disk")
	}
}

// TestContainerdCRI: the CRI plugin runs a pod with a runtime handler
// whose snapshotter is kiln: the images are pulled into kiln, the pod and
// its container run on kiln's snapshots, and exec works.
func TestContainerdCRI(t *testing.T) {
	needRunc(t)
	pause := mustPush(t, "cri/pause:v1", busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do busybox sleep 1; done"},
		Env:        []string{"PATH=/bin"},
	}))
	app := mustPush(t, "cri/app:v1", busyboxImage(t, v1.Config{Env: []string{"PATH=/bin"}},
		testimage.Layer{Tar: layerTar(t, tDir("etc", 0o755, epoch2020), tFile("etc/app", 0o644, epoch2020, "cri app\n"))}))
	e := startContainerd(t, testcontainerd.Options{CRI: true, SandboxImage: pause})
	crictl, podID, cid := criPod(t, e, app)
	if out := crictl("exec", "-s", cid, "busybox", "cat", "/etc/app", "/started"); out != "cri app\nstarted" {
		t.Errorf("crictl exec: %q", out)
	}
	// The pod and its container are kiln's snapshots.
	snaps := ctr(t, e, "-n", "k8s.io", "snapshots", "--snapshotter", "kiln", "ls")
	for _, id := range []string{podID, cid} {
		if !strings.Contains(snaps, id) {
			t.Errorf("kiln has no snapshot %s:\n%s", id, snaps)
		}
	}
	if m := ctdMounts(t, e, "k8s.io", cid); len(m) != 3 || !strings.HasPrefix(m[1].Source, e.KilnRoot) {
		t.Errorf("the container's mounts are not kiln's overlay form: %+v", m)
	}
	crictl("stop", cid)
	crictl("rm", cid)
	crictl("stopp", podID)
	crictl("rmp", podID)
}

// criPod pulls app through CRI for the runtime handler kiln and starts a
// pod with a container of it that writes /started, and returns crictl
// and the pod's and the container's ids.
func criPod(t *testing.T, e *testcontainerd.Env, app string) (crictl func(args ...string) string, podID, cid string) {
	t.Helper()
	dir := t.TempDir()
	writeJSON := func(name string, v any) string {
		p := filepath.Join(dir, name)
		b, _ := json.Marshal(v)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pod := writeJSON("pod.json", map[string]any{
		"metadata":      map[string]any{"name": "kiln-pod", "namespace": "default", "uid": "kiln-pod-uid", "attempt": 1},
		"log_directory": filepath.Join(dir, "logs"),
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
		// The runtime handler a pull is for (crictl pull has no flag).
		"annotations": map[string]string{"io.containerd.cri.runtime-handler": "kiln"},
	})
	container := writeJSON("container.json", map[string]any{
		"metadata": map[string]any{"name": "app"},
		"image":    map[string]any{"image": app},
		"command":  []string{"/bin/sh", "-c", "echo started > /started; while :; do busybox sleep 1; done"},
		"log_path": "app.log",
	})
	crictl = func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		out, err := e.Crictl(ctx, args...)
		t.Logf("crictl %s: %v", strings.Join(args, " "), errOr(err, "ok"))
		if err != nil {
			t.Fatalf("crictl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(out)
	}
	crictl("pull", "--pod-config", pod, app)
	podID = crictl("runp", "--runtime", "kiln", pod)
	cid = crictl("create", podID, container, pod)
	crictl("start", cid)
	return crictl, podID, cid
}

// TestContainerdOverlayBoot boots a microVM from an overlay-mode
// container's disks, as a shim would attach them: the image's shared disk
// read-only and the container's scratch writable, with kiln-init
// composing the overlay. A write survives a reboot in the scratch disk and
// the image's disk does not change.
func TestContainerdOverlayBoot(t *testing.T) {
	kernel := needBoot(t)
	img := busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd: []string{`if [ -f /data/marker ]; then echo kiln-overlay-again $(busybox cat /data/marker); ` +
			`else busybox mkdir -p /data && echo from-the-first-boot > /data/marker && echo kiln-overlay-first; fi`},
		Env: []string{"PATH=/bin"},
	})
	ref := mustPush(t, "overlay-boot/app:v1", img)
	e := startContainerd(t, testcontainerd.Options{Inject: []string{"init"}})
	const ns = "overlay-boot"
	sn := []string{"-n", ns, "snapshots", "--snapshotter", "kiln"}
	ctr(t, e, ctdPullArgs(ns, ref, false)...)
	ctr(t, e, append(sn, "prepare", "vm", ctdChainID(t, img))...)
	ctr(t, e, append(sn, "label", "vm", "containerd.io/gc.root=kiln-test")...)
	m := ctdMounts(t, e, ns, "vm")
	if len(m) != 3 {
		t.Fatalf("overlay container mounts: %+v", m)
	}
	scratch, disk := m[0].Source, m[1].Source
	before := fileSHA(t, disk)
	for i, want := range []string{"kiln-overlay-first", "kiln-overlay-again from-the-first-boot"} {
		status, _, console := bootWith(t, kernel, disk, []string{"--scratch", scratch})
		if status != 0 || !strings.Contains(console, want) {
			t.Fatalf("boot %d: status %d, console lacks %q:\n%s", i+1, status, want, tailLines(console, 30))
		}
	}
	if fileSHA(t, disk) != before {
		t.Errorf("booting changed the image's disk")
	}
	out, err := exec.Command("debugfs", "-R", "cat /upper/data/marker", scratch).Output()
	if err != nil || string(out) != "from-the-first-boot\n" {
		t.Errorf("the scratch disk's upper/data/marker: %q, %v", out, err)
	}
}

// TestContainerdCommit commits a container the way nerdctl commit does:
// kiln's differ computes the layer (Compare, reading the container's disk
// in userspace), a new image is made of it and pushed, and that image,
// pulled back into kiln, boots with the container's changes, the deleted
// file included. Compare refuses while the container runs.
func TestContainerdCommit(t *testing.T) {
	kernel := needBoot(t)
	needRunc(t)
	img := runImage(t, "commit")
	ref := mustPush(t, "commit/app:v1", img)
	e := startContainerd(t, testcontainerd.Options{DiffService: true, Inject: []string{"init"}})
	const ns = "commit"
	ctr(t, e, ctdPullArgs(ns, ref, false)...)

	for _, mode := range []string{"overlay", "copy"} {
		t.Run(mode, func(t *testing.T) {
			id := "commit-" + mode
			ctr(t, e, "-n", ns, "run", "--runc-root", e.RuncRoot(), "--fifo-dir", e.FIFODir(), "--snapshotter", "kiln",
				"--snapshotter-label", "containerd.io/snapshot/kiln.container-mode="+mode, ref, id,
				"/bin/sh", "-c", "echo made-in-"+mode+" > /committed && busybox rm /etc/gone")
			// A running container's disk is in use.
			busy := "busy-" + mode
			ctr(t, e, "-n", ns, "run", "-d", "--runc-root", e.RuncRoot(), "--fifo-dir", e.FIFODir(), "--snapshotter", "kiln",
				"--snapshotter-label", "containerd.io/snapshot/kiln.container-mode="+mode, ref, busy,
				"/bin/sh", "-c", "while :; do busybox sleep 1; done")
			waitTask(t, e, ns, busy)
			out := ctrFails(t, e, "-n", ns, "snapshots", "--snapshotter", "kiln", "diff", busy)
			ctdAssertContains(t, "a diff of a running container", out, "in use")
			ctr(t, e, "-n", ns, "task", "kill", "-s", "KILL", busy)
			waitTaskGone(t, e, ns, busy)
			ctr(t, e, "-n", ns, "container", "rm", busy)

			layer := commitLayer(t, e, ns, id)
			next, err := mutate.Append(img, mutate.Addendum{Layer: layer})
			if err != nil {
				t.Fatal(err)
			}
			committed := mustPush(t, "commit/app:"+mode, next)
			ctr(t, e, ctdPullArgs(ns, committed, false)...)
			out2 := filepath.Join(t.TempDir(), "committed.ext4")
			ctdExport(t, e, ns, committed, out2)
			fsck(t, out2)
			status, _, console := boot(t, kernel, out2)
			if want := "commit made-in-" + mode + " gone=yes"; status != 0 || !strings.Contains(console, want) {
				t.Errorf("booting the committed image: status %d, console lacks %q:\n%s", status, want, tailLines(console, 20))
			}
			ctr(t, e, "-n", ns, "container", "rm", id)
		})
	}
}

// commitLayer computes a container's layer with containerd's diff
// service, as nerdctl commit does, and returns it from the content store.
func commitLayer(t *testing.T, e *testcontainerd.Env, ns, key string) v1.Layer {
	t.Helper()
	client, ctx := ctdClient(t, e, ns)
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer done(context.Background()) //nolint:errcheck // the blob is read below
	desc, err := rootfs.CreateDiff(ctx, key, client.SnapshotService("kiln"), client.DiffService())
	if err != nil {
		t.Fatalf("diff of %s: %v", key, err)
	}
	// Garbage collection right away must not take the diff: the caller's
	// lease does not reach kiln, which leases the blob itself.
	ctdCollectGarbage(t, e, ns)
	info, err := client.ContentStore().Info(ctx, desc.Digest)
	if err != nil || info.Labels["containerd.io/uncompressed"] == "" {
		t.Errorf("the diff blob lacks the containerd.io/uncompressed label: %+v, %v", info.Labels, err)
	}
	blob, err := content.ReadBlob(ctx, client.ContentStore(), desc)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("diff of %s: %s, %d bytes (%s)", key, desc.Digest, desc.Size, desc.MediaType)
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(blob)), nil },
		tarball.WithMediaType(types.MediaType(desc.MediaType)))
	if err != nil {
		t.Fatal(err)
	}
	if diffID, err := layer.DiffID(); err != nil || diffID.String() != info.Labels["containerd.io/uncompressed"] {
		t.Errorf("the diff's uncompressed digest is %s, its label says %s (%v)", diffID, info.Labels["containerd.io/uncompressed"], err)
	}
	return layer
}

func waitTask(t *testing.T, e *testcontainerd.Env, ns, id string) {
	t.Helper()
	ctdEventually(t, "task "+id+" running", func() []string {
		out, _ := e.Ctr(context.Background(), "-n", ns, "task", "ls")
		if !strings.Contains(out, id) || !strings.Contains(out, "RUNNING") {
			return []string{out}
		}
		return nil
	})
}

func waitTaskGone(t *testing.T, e *testcontainerd.Env, ns, id string) {
	t.Helper()
	ctdEventually(t, "task "+id+" stopped", func() []string {
		out, _ := e.Ctr(context.Background(), "-n", ns, "task", "ls")
		if strings.Contains(out, id) && strings.Contains(out, "RUNNING") {
			return []string{out}
		}
		e.Ctr(context.Background(), "-n", ns, "task", "delete", id) //nolint:errcheck // it may be gone
		return nil
	})
}

// TestContainerdImageConfigs: images with the same layers but different
// configs share one disk, yet each boots its own Cmd: kiln export writes
// each image's config into its copy, byte-identical to kiln convert, and
// a container gets the config of the image its label names.
func TestContainerdImageConfigs(t *testing.T) {
	kernel := needBoot(t)
	imgs := map[string]v1.Image{}
	refs := map[string]string{}
	for _, name := range []string{"left", "right"} {
		imgs[name] = busyboxImage(t, v1.Config{
			Entrypoint: []string{"/bin/sh", "-c"},
			Cmd:        []string{"echo kiln-config-" + name},
			Env:        []string{"PATH=/bin"},
		})
		refs[name] = mustPush(t, "configs/"+name+":v1", imgs[name])
	}
	if ctdChainID(t, imgs["left"]) != ctdChainID(t, imgs["right"]) {
		t.Fatal("the two images do not share their layers")
	}
	e := startContainerd(t, testcontainerd.Options{Inject: []string{"init"}})
	const ns = "configs"
	for _, name := range []string{"left", "right"} {
		ctr(t, e, ctdPullArgs(ns, refs[name], false)...)
	}
	dir := t.TempDir()
	for _, name := range []string{"left", "right"} {
		exported := filepath.Join(dir, name+".ext4")
		ctdExport(t, e, ns, refs[name], exported)
		converted := filepath.Join(dir, name+"-convert.ext4")
		convert(t, refs[name], converted, filepath.Join(dir, "cache"), "--inject", "init")
		if a, b := fileSHA(t, exported), fileSHA(t, converted); a != b {
			t.Errorf("%s: kiln export sha256 %s, kiln convert --inject init %s", name, a, b)
		}
		fsck(t, exported)
		status, _, console := boot(t, kernel, exported)
		if status != 0 || !strings.Contains(console, "kiln-config-"+name) {
			t.Errorf("%s boots status %d, console lacks its own Cmd:\n%s", name, status, tailLines(console, 20))
		}
	}
	// One disk for both.
	if disks, _ := filepath.Glob(filepath.Join(e.KilnRoot, "snapshots", "*", "disk.ext4")); len(disks) != 1 {
		t.Errorf("kiln holds %d disks for two images with the same layers, want 1", len(disks))
	}
	// A container gets the config its label names; without a label, the
	// images disagree and it gets none.
	sn := []string{"-n", ns, "snapshots", "--snapshotter", "kiln"}
	chain := ctdChainID(t, imgs["left"])
	ctdPrepare(t, e, ns, "labelled", chain, map[string]string{"containerd.io/snapshot/kiln.image": refs["right"]})
	ctdPrepare(t, e, ns, "unlabelled", chain, nil)
	cfg, err := exec.Command("debugfs", "-R", "cat /upper/.kiln/image-config.json", ctdMounts(t, e, ns, "labelled")[0].Source).Output()
	if err != nil || !strings.Contains(string(cfg), "kiln-config-right") {
		t.Errorf("the labelled container's config: %v\n%s", err, cfg)
	}
	if out, _ := exec.Command("debugfs", "-R", "stat /upper/.kiln/image-config.json", ctdMounts(t, e, ns, "unlabelled")[0].Source).CombinedOutput(); !strings.Contains(string(out), "File not found") {
		t.Errorf("an unlabelled container on layers two configs share got a config:\n%s", out)
	}
	ctdAssertContains(t, "kiln's log", e.KilnLog(), "containerd.io/snapshot/kiln.image")
	ctr(t, e, append(sn, "rm", "labelled", "unlabelled")...)
}

// TestContainerdDiskLifecycle: a snapshot's usage counts its disk; a disk
// that no image's top needs any more goes (its layer stays for the image
// built on it), and comes back when needed.
func TestContainerdDiskLifecycle(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	base := ctdSmallImage(t, "lifecycle base")
	app, err := mutate.AppendLayers(base, static.NewLayer(layerTar(t, tFile("app", 0o644, epoch2020, "app")), types.OCIUncompressedLayer))
	if err != nil {
		t.Fatal(err)
	}
	baseRef, appRef := mustPush(t, "lifecycle/base:v1", base), mustPush(t, "lifecycle/app:v1", app)
	e := startContainerd(t, testcontainerd.Options{UnusedDiskGrace: "1s"})
	const ns = "lifecycle"
	ctr(t, e, ctdPullArgs(ns, baseRef, false)...)
	ctr(t, e, ctdPullArgs(ns, appRef, false)...)
	baseDisk, appDisk := imageDisk(t, e, ns, base), imageDisk(t, e, ns, app)

	usage := ctr(t, e, "-n", ns, "snapshots", "--snapshotter", "kiln", "usage", ctdChainID(t, base))
	if size := ctdUsageBytes(t, usage); size < fileAllocated(t, baseDisk) {
		t.Errorf("the base's usage (%d bytes) leaves out its disk (%d bytes):\n%s", size, fileAllocated(t, baseDisk), usage)
	}
	ctr(t, e, "-n", ns, "image", "rm", "--sync", baseRef)
	ctdEventually(t, "the base's disk after removing the base image", func() []string {
		if ctdExists(baseDisk) {
			return []string{baseDisk + " is still there"}
		}
		return nil
	})
	if !ctdLayerStored(filepath.Dir(baseDisk)) {
		t.Errorf("the base's layer went with its disk")
	}
	if !ctdExists(appDisk) {
		t.Errorf("the app's disk went")
	}
	// Needed again, built again, the same bytes.
	ctr(t, e, ctdPullArgs(ns, baseRef, false)...)
	again := filepath.Join(t.TempDir(), "base.ext4")
	ctdExport(t, e, ns, baseRef, again)
	want := filepath.Join(t.TempDir(), "want.ext4")
	convert(t, baseRef, want, t.TempDir())
	if fileSHA(t, again) != fileSHA(t, want) {
		t.Errorf("the rebuilt base disk differs from kiln convert's")
	}
}

// ctdUsageBytes reads the size column of `ctr snapshots usage KEY`
// ("KEY 12.5 MiB 42").
func ctdUsageBytes(t *testing.T, out string) int64 {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	m := regexp.MustCompile(`\s([0-9.]+)\s*([kKMG]i?B|B)\s`).FindStringSubmatch(lines[len(lines)-1] + " ")
	if m == nil {
		t.Fatalf("ctr snapshots usage: %q", out)
	}
	n, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	mult := map[string]float64{"B": 1, "kB": 1e3, "KB": 1e3, "KiB": 1 << 10, "MB": 1e6, "MiB": 1 << 20, "GB": 1e9, "GiB": 1 << 30}[m[2]]
	return int64(n * mult)
}

func fileAllocated(t *testing.T, p string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-B1", "--", p).Output()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	fmt.Sscan(string(out), &n) //nolint:errcheck // zero fails the comparison
	return n * 99 / 100        // du and the snapshotter round differently
}
