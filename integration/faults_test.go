package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/internal/fstree"
)

// The tests in this file inject faults into kiln serve beside a real
// containerd: kill -9 of kiln serve in each phase of a pull, an export
// and a removal, kill -9 of containerd in the middle of a pull, and
// kiln's disk filling up. After each, once what was killed is back: the
// pull works again, every disk kiln serves is clean to e2fsck -fn, an
// image pulled before the fault exports the same bytes as before, and
// once containerd's garbage collection ran, kiln's root holds the files
// of the snapshots kiln records, each known to containerd, and nothing
// else.
//
// The kill points are found from the outside: the registry stops a blob
// download halfway, files of a phase show up in kiln's root (polled
// every millisecond, or watched with inotify for the short removal), the
// export holds the disk open.

const faultNS = "faults"

// faultRig is a containerd and kiln serve holding one image pulled before
// any fault, and what its export was then.
type faultRig struct {
	e         *testcontainerd.Env
	dir       string // exports
	keptRef   string
	keptChain string
	keptSHA   string
	// victimRef is the image the faults hit, and victimSHA what kiln
	// export of it must give.
	victimRef, victimSHA string
}

func newFaultRig(t *testing.T, opts testcontainerd.Options, kept v1.Image, keptRef, victimRef, victimSHA string) *faultRig {
	t.Helper()
	r := &faultRig{
		e: startContainerd(t, opts), dir: t.TempDir(),
		keptRef: keptRef, keptChain: ctdChainID(t, kept), victimRef: victimRef, victimSHA: victimSHA,
	}
	ctr(t, r.e, ctdPullArgs(faultNS, keptRef, false)...)
	r.keptSHA = r.export(t, keptRef)
	return r
}

// export runs kiln export of ref, checks the file with e2fsck and returns
// its sha256.
func (r *faultRig) export(t *testing.T, ref string) string {
	t.Helper()
	out := filepath.Join(r.dir, "export.ext4")
	ctdExport(t, r.e, faultNS, ref, out)
	fsck(t, out)
	sum := fileSHA(t, out)
	os.Remove(out)
	return sum
}

// pullVictim starts pulling the victim image.
func (r *faultRig) pullVictim(t *testing.T) *faultCmd {
	return faultCtr(t, r.e, ctdPullArgs(faultNS, r.victimRef, false)...)
}

// recovered checks everything a fault must leave intact, once what was
// killed is back.
func (r *faultRig) recovered(t *testing.T) {
	t.Helper()
	if !r.e.KilnRunning() {
		t.Fatalf("kiln serve exited:\n%s", ctdTail(r.e.KilnLog(), 4000))
	}
	r.waitReachable(t)
	ctr(t, r.e, ctdPullArgs(faultNS, r.victimRef, false)...)
	if got := r.export(t, r.victimRef); got != r.victimSHA {
		t.Errorf("kiln export after the fault: sha256 %s, kiln convert: %s", got, r.victimSHA)
	}
	r.intact(t)
}

// intact checks that the image pulled before the fault exports as it
// did, and that once containerd's garbage collection ran, kiln's disks
// are clean and its root holds no orphan.
func (r *faultRig) intact(t *testing.T) {
	t.Helper()
	if got := r.export(t, r.keptRef); got != r.keptSHA {
		t.Errorf("the image pulled before the fault changed: its export had sha256 %s, now %s", r.keptSHA, got)
	}
	r.collectGarbage(t)
	r.fsckDisks(t)
	r.checkRoot(t)
}

// waitReachable waits until containerd reaches kiln again: after a
// restart of kiln, containerd's connection to it comes back after a
// back-off of up to a few seconds.
func (r *faultRig) waitReachable(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		// Stat goes through to kiln.
		out, err := r.e.Ctr(context.Background(), "-n", faultNS, "snapshots", "--snapshotter", "kiln", "info", r.keptChain)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd does not reach kiln serve: %v\n%s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// collectGarbage runs containerd's garbage collection with kiln's
// snapshots in it, as containerd does after it removed one of them: the
// leases a killed containerd left are dropped (as their expiry would),
// and a view is made and removed so that the collection visits kiln.
func (r *faultRig) collectGarbage(t *testing.T) {
	t.Helper()
	client, ctx := ctdClient(t, r.e, faultNS)
	ls := client.LeasesService()
	left, err := ls.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range left {
		t.Logf("dropping lease %s (labels %v)", l.ID, l.Labels)
		if err := ls.Delete(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	sn := client.SnapshotService("kiln")
	if _, err := sn.View(ctx, "faults-gc-probe", r.keptChain); err != nil {
		t.Fatal(err)
	}
	// The view holds no lease: a collection the dropped leases set off
	// may have removed it already, and visited kiln doing so.
	if err := sn.Remove(ctx, "faults-gc-probe"); err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	ctdCollectGarbage(t, r.e, faultNS)
}

// fsckDisks checks every disk kiln serves with e2fsck -fn: images'
// disks, containers' and the scratch disk templates.
func (r *faultRig) fsckDisks(t *testing.T) {
	t.Helper()
	for _, pattern := range []string{"snapshots/*/*.ext4", "templates/*.ext4", "empty.ext4"} {
		disks, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, pattern))
		for _, d := range disks {
			fsck(t, d)
		}
	}
}

// checkRoot compares what kiln's root holds with the snapshots kiln
// records and containerd knows: kiln serve is stopped meanwhile, so that
// its metadata can be read, and started again.
func (r *faultRig) checkRoot(t *testing.T) {
	t.Helper()
	client, ctx := ctdClient(t, r.e, faultNS)
	known := map[string]bool{} // namespace/key
	nss, err := client.NamespaceService().List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		err := client.SnapshotService("kiln").Walk(nctx, func(_ context.Context, info snapshots.Info) error {
			known[ns+"/"+info.Name] = true
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := r.e.StopKiln(); err != nil {
		t.Fatalf("stopping kiln serve: %v", err)
	}
	problems := faultRootProblems(t, r.e.KilnRoot, known)
	if err := r.e.StartKiln(); err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Errorf("kiln's root after containerd's garbage collection:\n%s", strings.Join(problems, "\n"))
	}
}

// faultRootProblems lists what is wrong with a stopped kiln's root:
// snapshot directories of no snapshot kiln records, snapshots without
// their directory or with files half written, snapshots containerd does
// not know (known: namespace/key), and anything in the work directory.
func faultRootProblems(t *testing.T, root string, known map[string]bool) []string {
	t.Helper()
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	ids := map[string]string{}   // id -> key
	kinds := map[string]string{} // id -> kind
	err = ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		if ids, err = storage.IDMap(ctx); err != nil {
			return err
		}
		for id, key := range ids {
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			kinds[id] = info.Kind.String()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var problems []string
	var records []string
	for id, key := range ids {
		records = append(records, fmt.Sprintf("%s: %s %s", id, kinds[id], key))
		dir := filepath.Join(root, "snapshots", id)
		if !ctdExists(dir) {
			problems = append(problems, fmt.Sprintf("snapshot %s (%s) has no directory", id, key))
		}
		// Backend keys are namespace/N/key.
		parts := strings.SplitN(key, "/", 3)
		if len(parts) != 3 || !known[parts[0]+"/"+parts[2]] {
			problems = append(problems, fmt.Sprintf("snapshot %s (%s %s) is not known to containerd", id, kinds[id], key))
		}
		if kinds[id] == snapshots.KindCommitted.String() && ctdExists(filepath.Join(dir, "layer")) &&
			!ctdLayerStored(dir) && ctdEmptyDir(filepath.Join(dir, "fs")) {
			problems = append(problems, fmt.Sprintf("committed layer %s (%s) has no layer", id, key))
		}
	}
	sort.Strings(records)
	t.Logf("kiln records %d snapshots:\n%s", len(ids), strings.Join(records, "\n"))
	ents, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, ok := ids[e.Name()]; !ok {
			problems = append(problems, fmt.Sprintf("snapshots/%s belongs to no snapshot: %v", e.Name(),
				faultList(filepath.Join(root, "snapshots", e.Name()))))
		}
	}
	half, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "*.tmp"))
	templates, _ := filepath.Glob(filepath.Join(root, "templates", "*.tmp"))
	for _, p := range append(half, templates...) {
		problems = append(problems, "a file half written: "+p)
	}
	unsynced, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "disk.unsynced"))
	for _, p := range unsynced {
		problems = append(problems, "kiln stopped and left an unsynced mark: "+p)
	}
	if left := faultList(filepath.Join(root, "tmp")); len(left) > 0 {
		problems = append(problems, fmt.Sprintf("kiln's work directory is not empty: %v", left))
	}
	tops := map[string]bool{"snapshots": true, "tmp": true, "empty": true, "templates": true,
		"metadata.db": true, "disks.key": true, "empty.ext4": true, "serve.lock": true}
	for _, name := range faultList(root) {
		if !tops[name] {
			problems = append(problems, "in kiln's root, not kiln's: "+name)
		}
	}
	return problems
}

// faultList lists a directory's entries.
func faultList(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// faultCmd is a command running while the test injects a fault.
type faultCmd struct {
	done chan struct{}
	out  string
	err  error
}

// faultCtr starts ctr in the background.
func faultCtr(t *testing.T, e *testcontainerd.Env, args ...string) *faultCmd {
	t.Helper()
	c := &faultCmd{done: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	go func() {
		defer close(c.done)
		defer cancel()
		c.out, c.err = e.Ctr(ctx, args...)
	}()
	t.Cleanup(func() { <-c.done })
	return c
}

// wait waits for the command and logs how it ended.
func (c *faultCmd) wait(t *testing.T, what string) error {
	t.Helper()
	<-c.done
	if c.err != nil {
		t.Logf("%s: %v: %s", what, c.err, ctdLastLine(c.out))
	} else {
		t.Logf("%s: ok", what)
	}
	return c.err
}

// faultWaitFor polls cond every millisecond until it holds. It fails the
// test when finished closes first (what was to be interrupted is over:
// the kill point was missed) or after a minute.
func faultWaitFor(t *testing.T, what string, cond func() bool, finished <-chan struct{}) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		select {
		case <-finished:
			t.Fatalf("it finished before the kill point: %s", what)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no kill point after a minute: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// fileGrew returns a condition that holds once a file matching pattern
// (under kiln's root) has 16 MiB on disk: its phase is well under way.
func (r *faultRig) fileGrew(pattern string) func() bool {
	return func() bool {
		files, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, pattern))
		for _, f := range files {
			var st unix.Stat_t
			if unix.Stat(f, &st) == nil && st.Blocks*512 >= 16<<20 {
				return true
			}
		}
		return false
	}
}

// building reports whether kiln is building a disk: in the data file of
// the image's top layer, which then grows past the layer's data space
// (see fstree.StoreLayer), or as a new file in its work directory.
func (r *faultRig) building() bool {
	if r.fileGrew(filepath.Join("tmp", "*", "disk.ext4"))() {
		return true
	}
	records, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, "snapshots", "*", "layer.record"))
	for _, rec := range records {
		st, err := fstree.ReadStored(rec)
		fi, serr := os.Stat(filepath.Join(filepath.Dir(rec), "data"))
		if err == nil && serr == nil && fi.Size() > st.End {
			return true
		}
	}
	return false
}

// restartKiln kills kiln serve (kill -9), waits for cmd (if any) to end,
// and starts kiln serve again.
func (r *faultRig) restartKiln(t *testing.T, cmd *faultCmd, what string) {
	t.Helper()
	r.e.KillKiln()
	if cmd != nil {
		cmd.wait(t, what)
	}
	if err := r.e.StartKiln(); err != nil {
		t.Fatal(err)
	}
}

// faultWatch reports the first inotify event of mask on an entry of dir
// (the directory stays watched when it is renamed), so that the test can
// act within microseconds.
func faultWatch(t *testing.T, dir string, mask uint32) <-chan struct{} {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "inotify") // reads through Go's poller: Close ends them
	t.Cleanup(func() { f.Close() })
	found := make(chan struct{})
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			if n >= unix.SizeofInotifyEvent {
				close(found)
				return
			}
		}
	}()
	return found
}

// faultOpenFiles lists the files a process has open.
func faultOpenFiles(pid int) []string {
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	var out []string
	for _, fd := range fds {
		if p, err := os.Readlink(fd); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// TestFaultsKilled kills kiln serve (kill -9) while containerd fetches a
// layer kiln has prepared a snapshot for, while kiln's differ stores the
// layer, while kiln builds the image's disk, while kiln export copies the
// disk, while kiln removes the image's snapshot and while it formats a
// container's scratch disk; and containerd while kiln's differ stores a
// layer. After each, with what was killed started again, the checks of
// recovered (or intact) hold.
func TestFaultsKilled(t *testing.T) {
	needRoot(t, "containerd and kiln serve run as root")
	victimRef, victimSHA := faultVictim(t)
	kept := ctdSmallImage(t, "pulled before the faults")
	keptRef := mustPush(t, "faults-kept:v1", kept)
	rig := func(t *testing.T) *faultRig {
		return newFaultRig(t, testcontainerd.Options{}, kept, keptRef, victimRef, victimSHA)
	}
	// The files of a phase, in kiln's root.
	layerTmp := filepath.Join("snapshots", "*", "data.tmp")

	t.Run("kiln-mid-fetch", func(t *testing.T) {
		r := rig(t)
		hold := reg.HoldBlob(layerDigests(t, minbase.img)[0])
		t.Cleanup(hold.Release)
		pull := r.pullVictim(t)
		select {
		case <-hold.Reached:
		case <-pull.done:
			t.Fatalf("the pull ended before fetching the layer: %v\n%s", pull.err, pull.out)
		}
		// containerd has prepared the layer's snapshot with kiln (a layer
		// snapshot with no layer yet) and is fetching the blob.
		markers, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, "snapshots", "*", "layer"))
		if empty := slices.DeleteFunc(markers, func(m string) bool { return ctdLayerStored(filepath.Dir(m)) }); len(empty) != 1 {
			t.Errorf("extraction snapshots waiting for their layer while it is fetched: %v, want one", empty)
		}
		r.restartKiln(t, nil, "")
		// The pull goes on with the snapshot the killed kiln prepared.
		hold.Release()
		if err := pull.wait(t, "the pull, kiln restarted while containerd fetched"); err != nil {
			t.Errorf("the pull failed: %v", err)
		}
		r.recovered(t)
	})

	t.Run("kiln-mid-apply", func(t *testing.T) {
		r := rig(t)
		pull := r.pullVictim(t)
		faultWaitFor(t, "kiln's differ writing the layer", r.fileGrew(layerTmp), pull.done)
		r.restartKiln(t, pull, "the pull, kiln killed while storing the layer")
		r.recovered(t)
	})

	t.Run("kiln-mid-build", func(t *testing.T) {
		r := rig(t)
		// The pull builds the image's disk once its layer is in, and may
		// return meanwhile.
		pull := r.pullVictim(t)
		faultWaitFor(t, "kiln writing the disk", r.building, nil)
		r.restartKiln(t, pull, "the pull, kiln killed while building the disk")
		r.recovered(t)
	})

	t.Run("kiln-mid-export", func(t *testing.T) {
		r := rig(t)
		ctr(t, r.e, ctdPullArgs(faultNS, victimRef, false)...)
		out := filepath.Join(r.dir, "interrupted.ext4")
		cmd := exec.Command(kilnBin, "export", victimRef, "-o", out, "--namespace", faultNS, "--address", r.e.Address)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		var err error
		go func() { err = cmd.Wait(); close(done) }()
		faultWaitFor(t, "kiln export copying the disk", func() bool {
			return slices.ContainsFunc(faultOpenFiles(cmd.Process.Pid), func(f string) bool { return strings.HasSuffix(f, "/disk.ext4") })
		}, done)
		r.e.KillKiln()
		<-done
		// kiln export needs no more of kiln once it has the disk open:
		// it ends as if kiln had removed its view.
		t.Logf("kiln export, kiln serve killed while it copied: %v: %s", errOr(err, "ok"), strings.TrimSpace(stderr.String()))
		if err == nil {
			fsck(t, out)
			if got := fileSHA(t, out); got != victimSHA {
				t.Errorf("the export kiln serve died under: sha256 %s, kiln convert: %s", got, victimSHA)
			}
		} else if _, serr := os.Lstat(out); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("the failed export left %s", out)
		}
		r.restartKiln(t, nil, "")
		r.recovered(t)
	})

	t.Run("kiln-mid-remove", func(t *testing.T) {
		r := rig(t)
		ctr(t, r.e, ctdPullArgs(faultNS, victimRef, false)...)
		r.export(t, victimRef) // its disk is built
		// Removing renames the snapshot's directory in the transaction
		// that forgets the snapshot, then deletes its files.
		id := faultSnapshotOf(t, r.e.KilnRoot, minbaseDiffID(t))
		deleting := faultWatch(t, filepath.Join(r.e.KilnRoot, "snapshots", id), unix.IN_DELETE)
		rm := faultCtr(t, r.e, "-n", faultNS, "image", "rm", "--sync", victimRef)
		select {
		case <-deleting:
			r.e.KillKiln()
			renamed := filepath.Join(r.e.KilnRoot, "snapshots", "rm-"+id)
			t.Logf("kiln killed while deleting the image's snapshot's files: %s holds %v", renamed, faultList(renamed))
		case <-rm.done:
			t.Fatalf("the image was removed and kiln never deleted its snapshot's files: %v\n%s", rm.err, rm.out)
		case <-time.After(time.Minute):
			t.Fatal("kiln did not start removing the image's snapshot in a minute")
		}
		r.restartKiln(t, rm, "the image's removal, kiln killed while removing its snapshot")
		r.recovered(t)
	})

	t.Run("kiln-mid-container", func(t *testing.T) {
		r := rig(t)
		sn := []string{"-n", faultNS, "snapshots", "--snapshotter", "kiln"}
		// The first container formats the scratch disk template.
		prep := faultCtr(t, r.e, append(sn, "prepare", "c1", r.keptChain)...)
		faultWaitFor(t, "kiln formatting a scratch disk", func() bool {
			for _, pattern := range []string{"tmp/*/scratch-*", "templates/*.tmp"} {
				if m, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, pattern)); len(m) > 0 {
					return true
				}
			}
			return false
		}, prep.done)
		r.restartKiln(t, prep, "the container's prepare, kiln killed while it formatted the scratch disk")
		r.waitReachable(t)
		// Checked before another container of that size would make the
		// template again.
		r.intact(t)
		ctr(t, r.e, append(sn, "prepare", "c2", r.keptChain)...)
		r.fsckDisks(t)
		ctr(t, r.e, append(sn, "rm", "c2")...)
	})

	t.Run("containerd-mid-apply", func(t *testing.T) {
		r := rig(t)
		pull := r.pullVictim(t)
		faultWaitFor(t, "kiln's differ writing the layer", r.fileGrew(layerTmp), pull.done)
		r.e.KillContainerd()
		if err := pull.wait(t, "the pull, containerd killed while kiln stored the layer"); err == nil {
			t.Errorf("the pull succeeded though containerd was killed")
		}
		// kiln, still up, drops the layer it was storing.
		ctdEventually(t, "kiln's differ after containerd died", func() []string {
			var problems []string
			if tmps, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, layerTmp)); len(tmps) > 0 {
				problems = append(problems, fmt.Sprintf("layers half stored: %v", tmps))
			}
			if left := faultList(filepath.Join(r.e.KilnRoot, "tmp")); len(left) > 0 {
				problems = append(problems, fmt.Sprintf("kiln's work directory: %v", left))
			}
			return problems
		})
		if err := r.e.StartContainerd(); err != nil {
			t.Fatal(err)
		}
		r.recovered(t)
	})
}

// faultVictim returns the image the faults hit (the minbase image) and
// the sha256 of what kiln convert makes of it, which kiln export must
// give too.
func faultVictim(t *testing.T) (ref, sha string) {
	t.Helper()
	ref = minbaseRef(t)
	faultVictimSHA.once.Do(func() {
		dir, err := os.MkdirTemp("", "kiln-faults-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		out := filepath.Join(dir, "convert.ext4")
		convert(t, ref, out, filepath.Join(dir, "cache"))
		faultVictimSHA.sha = fileSHA(t, out)
	})
	if faultVictimSHA.sha == "" {
		t.Fatal("kiln convert of the minbase image failed before")
	}
	return ref, faultVictimSHA.sha
}

var faultVictimSHA struct {
	once sync.Once
	sha  string
}

// minbaseDiffID is the diffID of the minbase image's layer.
func minbaseDiffID(t *testing.T) string {
	t.Helper()
	cf, err := minbase.img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return cf.RootFS.DiffIDs[0].String()
}

// faultSnapshotOf returns the ID of the snapshot under kiln's root that
// holds the layer with diffID.
func faultSnapshotOf(t *testing.T, root, diffID string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "diffid"))
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == diffID {
			return filepath.Base(filepath.Dir(f))
		}
	}
	t.Fatalf("no snapshot under %s holds the layer %s", root, diffID)
	return ""
}

// TestFaultsDiskFull puts kiln's root on a small ext4 of its own and
// fills it: first so that an image's layer does not fit, then so that
// its layers fit but its disk does not (a small layer on the minbase
// layer: the disk, built in the small layer's data file, needs a copy of
// the minbase layer's contents). Each time the error that reaches
// ctr says the disk is full, kiln serve stays up, nothing half written
// stays in kiln's root, and once there is room again (a smaller image, a
// filler file removed) the same requests work.
func TestFaultsDiskFull(t *testing.T) {
	needRoot(t, "mounts a small ext4 for kiln's root")
	victimRef, victimSHA := faultVictim(t)
	fi, err := os.Stat(minbase.tar)
	if err != nil {
		t.Fatal(err)
	}
	layerSize := fi.Size()
	kept := ctdSmallImage(t, "pulled before the disk filled up")
	keptRef := mustPush(t, "faults-full-kept:v1", kept)
	smallRef := mustPush(t, "faults-full-small:v1", ctdSmallImage(t, "pulled on a full disk"))
	laterRef := mustPush(t, "faults-full-later:v1", ctdSmallImage(t, "pulled once there is room"))
	small, err := ctdSmallImage(t, "on the minbase layer").Layers()
	if err != nil {
		t.Fatal(err)
	}
	stacked, err := mutate.AppendLayers(minbase.img, small...)
	if err != nil {
		t.Fatal(err)
	}
	stackedRef, stackedChain := mustPush(t, "faults-full-stacked:v1", stacked), ctdChainID(t, stacked)
	mnt := faultSmallDisk(t, layerSize+320<<20)
	r := newFaultRig(t, testcontainerd.Options{KilnRoot: filepath.Join(mnt, "kiln")}, kept, keptRef, victimRef, victimSHA)
	filler := filepath.Join(mnt, "filler")
	sn := []string{"-n", faultNS, "snapshots", "--snapshotter", "kiln"}
	full := func(t *testing.T, what, out string) {
		t.Helper()
		ctdAssertContains(t, what, ctdLastLine(out), "no space left on device")
		if !r.e.KilnRunning() {
			t.Fatalf("kiln serve exited:\n%s", ctdTail(r.e.KilnLog(), 4000))
		}
	}

	t.Run("layer", func(t *testing.T) {
		faultFill(t, filler, mnt, 48<<20)
		out := ctrFails(t, r.e, ctdPullArgs(faultNS, victimRef, false)...)
		full(t, "the pull's error", out)
		ctdAssertContains(t, "the pull's error", ctdLastLine(out), layerDigests(t, minbase.img)[0])
		// What kiln wrote of the layer is gone: a smaller image fits.
		ctr(t, r.e, ctdPullArgs(faultNS, smallRef, false)...)
		r.export(t, smallRef)
		r.collectGarbage(t)
		r.checkRoot(t)
	})

	t.Run("nothing-free", func(t *testing.T) {
		// Not a block left: what needs room fails and says so, a removal
		// works, and once there is room the same requests work.
		faultFill(t, filler, mnt, 0)
		full(t, "the view's error", ctrFails(t, r.e, append(sn, "view", "full-view", r.keptChain)...))
		full(t, "the pull's error", ctrFails(t, r.e, ctdPullArgs(faultNS, laterRef, false)...))
		// kiln serve starts on a full disk, as after a crash.
		r.restartKiln(t, nil, "")
		r.waitReachable(t)
		full(t, "the view's error", ctrFails(t, r.e, append(sn, "view", "full-view", r.keptChain)...))
		ctr(t, r.e, "-n", faultNS, "image", "rm", "--sync", smallRef)
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		ctr(t, r.e, append(sn, "view", "full-view", r.keptChain)...)
		ctr(t, r.e, append(sn, "rm", "full-view")...)
		ctr(t, r.e, ctdPullArgs(faultNS, laterRef, false)...)
		r.export(t, laterRef)
		r.intact(t)
	})

	t.Run("disk", func(t *testing.T) {
		faultFill(t, filler, mnt, layerSize+40<<20)
		ctr(t, r.e, ctdPullArgs(faultNS, stackedRef, false)...)
		out := ctrFails(t, r.e, append(sn, "view", "full-view", stackedChain)...)
		full(t, "the view's error", out)
		// It names the image's layers and where kiln ran out of space,
		// and kiln logs it too (the pull's eager build failed unseen).
		ctdAssertContains(t, "the view's error", ctdLastLine(out), stackedChain, r.e.KilnRoot)
		var logged []string
		for _, l := range strings.Split(r.e.KilnLog(), "\n") {
			if strings.Contains(l, "level=error") && strings.Contains(l, "no space left on device") && strings.Contains(l, "building") {
				logged = append(logged, l)
			}
		}
		if len(logged) == 0 {
			t.Errorf("kiln logged no error for the builds that ran out of space")
		}
		top := faultSnapshotOf(t, r.e.KilnRoot, ctdTopDiffID(t, stacked))
		for _, f := range []string{"disk.ext4", "disk.building"} {
			if ctdExists(filepath.Join(r.e.KilnRoot, "snapshots", top, f)) {
				t.Errorf("a build that ran out of space left the top layer's %s", f)
			}
		}
		if !ctdExists(filepath.Join(r.e.KilnRoot, "snapshots", top, "data")) {
			t.Errorf("a build that ran out of space lost the top layer's data file")
		}
		half, _ := filepath.Glob(filepath.Join(r.e.KilnRoot, "tmp", "*", "*.ext4"))
		if len(half) > 0 {
			t.Errorf("a build that ran out of space left %v", half)
		}
		// Room again: the same view works.
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		ctr(t, r.e, append(sn, "view", "full-view", stackedChain)...)
		ctr(t, r.e, append(sn, "rm", "full-view")...)
		r.recovered(t)
	})
}

// ctdTopDiffID is the diffID of an image's top layer.
func ctdTopDiffID(t *testing.T, img v1.Image) string {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return cf.RootFS.DiffIDs[len(cf.RootFS.DiffIDs)-1].String()
}

// faultSmallDisk mounts a new ext4 of size bytes (a file on a loop
// device) on a new directory and returns the directory. It is unmounted
// when the test ends, after what the test starts later has stopped.
func faultSmallDisk(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "disk.img"), filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -o loop: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
			exec.Command("umount", "-l", mnt).Run() //nolint:errcheck // best effort
		}
	})
	return mnt
}

// faultFill makes the file filler take all but free bytes of the
// filesystem at dir (with free 0, every block it can).
func faultFill(t *testing.T, filler, dir string, free int64) {
	t.Helper()
	os.Remove(filler)
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// Blocks freed are counted free once the journal commits them.
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(d.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	n := int64(st.Bavail)*st.Bsize - free
	if n <= 0 {
		t.Fatalf("%s has %d bytes free, fewer than %d", dir, int64(st.Bavail)*st.Bsize, free)
	}
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if free == 0 {
		n -= 1 << 20 // room for the file's own extent tree
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, n); err != nil {
		t.Fatal(err)
	}
	if free == 0 {
		if _, err := f.Seek(0, io.SeekEnd); err != nil {
			t.Fatal(err)
		}
		for err == nil {
			_, err = f.Write(make([]byte, 4096))
		}
		if !errors.Is(err, unix.ENOSPC) {
			t.Fatal(err)
		}
	}
	t.Logf("%s: %d MiB of the filesystem left free", filler, free>>20)
}
