package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
)

// TestServeLazyRootfs: kiln serve with [share] lazy pulls an image that
// has a chunked rootfs published beside it without containerd
// downloading a layer, and serves its disk through FUSE with the bytes
// kiln convert builds. An image sharing its base layer but published
// without one is pulled as usual, the shared layer read from the
// registry for its disk. Containers of both modes run on the lazily
// loaded disk, also after kiln restarts. Removing the image unmounts its
// disk. With prefetch, the disk is written out whole once it has
// arrived, and later containers use that.
func TestServeLazyRootfs(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("FUSE is not available: %v", err) // startContainerd says why it needs root
	}
	reg := ggcrRegistry(t, true)
	dockerConfig := shareDockerConfig(t, reg.host)
	env := map[string]string{"DOCKER_CONFIG": dockerConfig}
	top := func(motd string) testimage.Layer {
		return testimage.Layer{Tar: layerTar(t, tDir("etc", 0o755, t1), tFile("etc/motd", 0o644, t2, motd),
			tFile("big", 0o644, t1, strings.Repeat("kiln lazily ", 400000)))}
	}
	imgA := busyboxImage(t, v1.Config{}, top("loaded lazily\n"))
	imgB := busyboxImage(t, v1.Config{}, top("pulled\n"))
	imgC := busyboxImage(t, v1.Config{Env: []string{"PATH=/bin"}})
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	push := func(repo string, img v1.Image) (ref, want string) {
		t.Helper()
		ref = reg.host + "/" + repo + ":v1"
		shareWrite(t, ref, img)
		local := filepath.Join(dir, repo+".ext4")
		if res := kiln(t, run{args: convertArgs(ref, local, cache, "--use-published=false"), env: env}); res.err != nil {
			t.Fatalf("kiln convert %s: %v\n%s", ref, res.err, res.stderr)
		}
		return ref, fileSHA(t, local)
	}
	refA, wantA := push("lazy-a", imgA)
	refB, wantB := push("lazy-b", imgB)
	if res := kiln(t, run{args: []string{"push", "--chunked", refA, "--cache-dir", cache}, env: env}); res.err != nil {
		t.Fatalf("kiln push --chunked: %v\n%s", res.err, res.stderr)
	}

	node := func(config string) *testcontainerd.Env {
		return startContainerd(t, testcontainerd.Options{Metrics: true, Config: "[share]\nlazy = true\n" + config, KilnEnv: []string{"DOCKER_CONFIG=" + dockerConfig}})
	}
	e := node("lazy_prefetch = false\n")
	pullIn := func(ns, ref string) {
		ctr(t, e, "-n", ns, "image", "pull", "--snapshotter", "kiln", "--user", shareUser+":"+sharePassword, ref)
	}
	pull := func(ref string) { pullIn("fleet", ref) }
	lazyMounts := func() []string {
		raw, err := os.ReadFile("/proc/self/mounts")
		if err != nil {
			t.Fatal(err)
		}
		var ms []string
		for _, l := range strings.Split(string(raw), "\n") {
			if f := strings.Fields(l); len(f) > 2 && strings.HasPrefix(f[1], filepath.Join(e.KilnRoot, "lazy")+"/") {
				ms = append(ms, f[1]+" ("+f[2]+")")
			}
		}
		return ms
	}

	// Image A: containerd takes in no layer, and the disk is the
	// published rootfs, served through FUSE.
	pull(refA)
	content := ctr(t, e, "-n", "fleet", "content", "ls", "-q")
	for _, d := range layerDigests(t, imgA) {
		if strings.Contains(content, d) {
			t.Errorf("containerd downloaded layer %s of the lazily loaded image", d)
		}
	}
	out := filepath.Join(dir, "a.ext4")
	ctdExport(t, e, "fleet", refA, out)
	if got := fileSHA(t, out); got != wantA {
		t.Errorf("the lazily loaded disk is %s, kiln convert builds %s", got, wantA)
	}
	mountA := ""
	if ms := lazyMounts(); len(ms) != 1 || !strings.Contains(ms[0], "fuse") {
		t.Errorf("lazily loaded disks mounted: %v, want one, through FUSE", ms)
	} else {
		mountA = ms[0]
	}
	metrics := ctdMetrics(t, e)
	for _, want := range []string{`kiln_shared_rootfs_total{result="lazy"} 1`, "kiln_lazy_disks 1"} {
		if !strings.Contains(metrics, want+"\n") {
			t.Errorf("the metrics do not say %s", want)
		}
	}
	if strings.Contains(metrics, "kiln_lazy_fetched_bytes_total 0\n") || !strings.Contains(metrics, "kiln_lazy_fetched_bytes_total ") {
		t.Errorf("kiln_lazy_fetched_bytes_total does not count the export's reads")
	}

	// Another namespace's pull uses the same snapshots and disk.
	pullIn("other", refA)
	out = filepath.Join(dir, "a-other.ext4")
	ctdExport(t, e, "other", refA, out)
	if got := fileSHA(t, out); got != wantA {
		t.Errorf("the lazily loaded disk in another namespace is %s, kiln convert builds %s", got, wantA)
	}
	if recs, _ := filepath.Glob(filepath.Join(e.KilnRoot, "snapshots", "*", "lazy.json")); len(recs) != 2 || len(lazyMounts()) != 1 {
		t.Errorf("after a second namespace's pull: %d lazily loaded layers and mounts %v, want the image's 2 layers and one disk", len(recs), lazyMounts())
	}
	ctr(t, e, "-n", "other", "image", "rm", "--sync", refA)

	// Image C is image A's base layer alone, published chunked too: its
	// layer came in with A, so containerd takes nothing in, and kiln
	// finds C's own published rootfs when its disk is first needed.
	refC, wantC := push("lazy-c", imgC)
	if res := kiln(t, run{args: []string{"push", "--chunked", refC, "--cache-dir", cache}, env: env}); res.err != nil {
		t.Fatalf("kiln push --chunked: %v\n%s", res.err, res.stderr)
	}
	pull(refC)
	out = filepath.Join(dir, "c.ext4")
	ctdExport(t, e, "fleet", refC, out)
	if got := fileSHA(t, out); got != wantC {
		t.Errorf("image C's disk is %s, kiln convert builds %s", got, wantC)
	}
	if ms := lazyMounts(); len(ms) != 2 {
		t.Errorf("lazily loaded disks mounted after image C's export: %v, want image A's and C's", ms)
	}

	// Containers: the lazily loaded disk is the read-only part, the
	// container's own disk sits beside it.
	runOn := func(id, mode string) {
		t.Helper()
		out := ctr(t, e, "-n", "fleet", "run", "--rm", "--runc-root", e.RuncRoot(), "--fifo-dir", e.FIFODir(), "--snapshotter", "kiln",
			"--snapshotter-label", "containerd.io/snapshot/kiln.container-mode="+mode,
			refA, id, "/bin/sh", "-c", "echo written > /written && busybox cat /etc/motd /written")
		ctdAssertContains(t, "ctr run ("+mode+")", out, "loaded lazily\nwritten")
	}
	runOn("lazy-overlay", "overlay")
	runOn("lazy-copy", "copy")
	ctr(t, e, "-n", "fleet", "snapshot", "--snapshotter", "kiln", "prepare", "lazy-c", ctdChainID(t, imgA))
	if m := ctdMounts(t, e, "fleet", "lazy-c"); len(m) != 3 || !strings.HasPrefix(m[1].Source, filepath.Join(e.KilnRoot, "lazy")+"/") {
		t.Errorf("a container on the lazily loaded image has mounts %+v, want its scratch disk over the lazily loaded one", m)
	}
	ctr(t, e, "-n", "fleet", "snapshot", "--snapshotter", "kiln", "rm", "lazy-c")

	// A killed kiln leaves a dead mount: the next one clears it, and
	// mounts the disk again when it is needed.
	restartKiln(t, e, "fleet")
	runOn("lazy-restarted", "overlay")
	if !strings.Contains(e.KilnLogs(), "clearing a dead FUSE mount") {
		t.Errorf("kiln did not clear the dead mount its killed predecessor left")
	}

	// Image B shares the base layer, which containerd does not take in
	// again; kiln builds B's disk reading it from the registry.
	pull(refB)
	content = ctr(t, e, "-n", "fleet", "content", "ls", "-q")
	if b := layerDigests(t, imgB); !strings.Contains(content, b[1]) {
		t.Errorf("containerd did not download image B's own layer %s", b[1])
	}
	out = filepath.Join(dir, "b.ext4")
	ctdExport(t, e, "fleet", refB, out)
	if got := fileSHA(t, out); got != wantB {
		t.Errorf("image B's disk is %s, kiln convert builds %s", got, wantB)
	}
	fsck(t, out)

	// Removing image A removes its snapshots (containerd's collector
	// runs on the removal) and unmounts the disk.
	ctr(t, e, "-n", "fleet", "image", "rm", "--sync", refA)
	ctdEventually(t, "the lazily loaded disk is unmounted", func() []string {
		if ms := lazyMounts(); slices.Contains(ms, mountA) {
			return []string{fmt.Sprintf("still mounted: %v", ms)}
		}
		return nil
	})
	out = filepath.Join(dir, "b2.ext4")
	ctdExport(t, e, "fleet", refB, out)
	if got := fileSHA(t, out); got != wantB {
		t.Errorf("image B's disk is %s after image A went, kiln convert builds %s", got, wantB)
	}

	// Prefetch: the disk arrives whole and is written out; a container
	// made after a kill of kiln runs on that copy.
	e2 := node("lazy_boot_window = \"1s\"\n")
	ctr(t, e2, "-n", "fleet", "image", "pull", "--snapshotter", "kiln", "--user", shareUser+":"+sharePassword, refA)
	var copies []string
	ctdEventually(t, "the prefetched disk is written out whole", func() []string {
		copies, _ = filepath.Glob(filepath.Join(e2.KilnRoot, "snapshots", "*", "disk.ext4"))
		if len(copies) != 1 {
			return []string{fmt.Sprintf("disks written: %v, want one", copies)}
		}
		return nil
	})
	if len(copies) == 1 {
		if got := fileSHA(t, copies[0]); got != wantA {
			t.Errorf("the disk written out is %s, kiln convert builds %s", got, wantA)
		}
	}
	restartKiln(t, e2, "fleet")
	out = filepath.Join(dir, "a-whole.ext4")
	ctdExport(t, e2, "fleet", refA, out)
	if got := fileSHA(t, out); got != wantA {
		t.Errorf("the disk after the restart is %s, kiln convert builds %s", got, wantA)
	}
	if strings.Count(e2.KilnLogs(), "serving a lazily loaded disk") != 1 {
		t.Errorf("kiln mounted the disk again after the restart instead of using the copy written out")
	}
}

// restartKiln kills kiln serve, starts it again and waits until
// containerd, which reconnects within its back-off, reaches it: listing
// the snapshots of namespace ns, which must have some, asks kiln about
// each.
func restartKiln(t *testing.T, e *testcontainerd.Env, ns string) {
	t.Helper()
	e.KillKiln()
	if err := e.StartKiln(); err != nil {
		t.Fatal(err)
	}
	ctdEventually(t, "containerd reaches kiln again", func() []string {
		if out, err := e.Ctr(context.Background(), "-n", ns, "snapshot", "--snapshotter", "kiln", "ls"); err != nil {
			return []string{ctdLastLine(out)}
		}
		return nil
	})
}

// TestServeLazyCRI: an image a pod pulls through CRI (containerd's
// transfer service, with the snapshot annotations kiln's drop-in turns
// on) is loaded lazily: containerd downloads none of its layers, and the
// pod's container runs on the lazily loaded disk. The pause image, whose
// only layer the app's image loaded lazily, gets a disk built from that
// layer, read from the registry.
func TestServeLazyCRI(t *testing.T) {
	needRunc(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("FUSE is not available: %v", err)
	}
	pause := mustPush(t, "cri-lazy/pause:v1", busyboxImage(t, v1.Config{
		Entrypoint: []string{"/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do busybox sleep 1; done"},
		Env:        []string{"PATH=/bin"},
	}))
	appImg := busyboxImage(t, v1.Config{Env: []string{"PATH=/bin"}},
		testimage.Layer{Tar: layerTar(t, tDir("etc", 0o755, t1), tFile("etc/app", 0o644, t1, "lazy cri app\n"))})
	app := mustPush(t, "cri-lazy/app:v1", appImg)
	publishChunked(t, app)
	e := startContainerd(t, testcontainerd.Options{CRI: true, SandboxImage: pause, Config: "[share]\nlazy = true\nlazy_prefetch = false\n"})
	crictl, podID, cid := criPod(t, e, app)
	if out := crictl("exec", "-s", cid, "busybox", "cat", "/etc/app", "/started"); out != "lazy cri app\nstarted" {
		t.Errorf("crictl exec: %q", out)
	}
	content := ctr(t, e, "-n", "k8s.io", "content", "ls", "-q")
	for _, d := range layerDigests(t, appImg) {
		if strings.Contains(content, d) {
			t.Errorf("containerd downloaded layer %s of the lazily loaded image", d)
		}
	}
	if m := ctdMounts(t, e, "k8s.io", cid); len(m) != 3 || !strings.HasPrefix(m[1].Source, filepath.Join(e.KilnRoot, "lazy")+"/") {
		t.Errorf("the container's mounts are not its scratch disk over the lazily loaded disk: %+v", m)
	}
	crictl("stop", cid)
	crictl("rm", cid)
	crictl("stopp", podID)
	crictl("rmp", podID)
}

// TestServeLazyBlockDevices: in block-device mode a container on a lazily
// loaded image gets a loop device on the FUSE-served disk; after kiln is
// killed (the device's disk served by nobody), the next kiln detaches
// that device and gives the container a working one again.
func TestServeLazyBlockDevices(t *testing.T) {
	needRoot(t, "loop devices")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("FUSE is not available: %v", err)
	}
	img := ctdSmallImage(t, "lazily loaded, block devices")
	ref := mustPush(t, "lazy-block:v1", img)
	publishChunked(t, ref)
	e := startContainerd(t, testcontainerd.Options{BlockDevices: true, Config: "[share]\nlazy = true\nlazy_prefetch = false\n"})
	const ns = "block"
	sn := []string{"-n", ns, "snapshots", "--snapshotter", "kiln"}
	ctr(t, e, ctdPullArgs(ns, ref, false)...)
	ctr(t, e, append(sn, "prepare", "c1", ctdChainID(t, img))...)
	ctr(t, e, append(sn, "label", "c1", "containerd.io/gc.root=kiln-test")...)
	check := func(when string) string {
		t.Helper()
		cm := ctdMounts(t, e, ns, "c1")
		if len(cm) != 3 || !strings.HasPrefix(cm[1].Source, "/dev/loop") {
			t.Fatalf("%s: container mounts in block-device mode: %+v", when, cm)
		}
		if f := testcontainerd.LoopDevices(e.KilnRoot)[cm[1].Source]; !strings.HasPrefix(f, filepath.Join(e.KilnRoot, "lazy")+"/") {
			t.Errorf("%s: the image's device %s is backed by %q, want the lazily loaded disk", when, cm[1].Source, f)
		}
		mnt, unmount := ctdMountSnapshot(t, e, ns, "c1")
		defer unmount()
		if b, err := os.ReadFile(filepath.Join(mnt, "etc/small")); err != nil || string(b) != "lazily loaded, block devices" {
			t.Errorf("%s: the container's /etc/small: %q, %v", when, b, err)
		}
		return cm[1].Source
	}
	before := check("before kiln's restart")
	restartKiln(t, e, ns)
	after := check("after kiln's restart")
	// The device on the dead mount is detached (or its number given to
	// the new one).
	if b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(before), "loop", "backing_file")); err == nil && before != after {
		t.Errorf("%s, on the dead mount, still attached after kiln's restart (backed by %s)", before, strings.TrimSpace(string(b)))
	}
}

// publishChunked builds ref, an image in the suite's registry, and
// publishes its chunked rootfs beside it.
func publishChunked(t *testing.T, ref string) {
	t.Helper()
	cache := filepath.Join(t.TempDir(), "cache")
	if res := kiln(t, run{args: convertArgs(ref, filepath.Join(t.TempDir(), "image.ext4"), cache)}); res.err != nil {
		t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
	}
	if res := kiln(t, run{args: []string{"push", "--chunked", ref, "--cache-dir", cache}}); res.err != nil {
		t.Fatalf("kiln push --chunked: %v\n%s", res.err, res.stderr)
	}
}
