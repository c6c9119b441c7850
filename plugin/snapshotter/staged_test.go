package snapshotter

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
)

// stageLayer does what kiln's differ does for an extraction snapshot
// whose parent may have a staged tree: it stores the layer, which
// replays it into the staged tree, then commits the snapshot as name.
func stageLayer(ctx context.Context, sn *Snapshotter, name, parent string, files map[string]string) error {
	key := "extract-" + name
	if _, _, err := writeLayer(ctx, sn, key, parent, files); err != nil {
		return err
	}
	return sn.Commit(ctx, name, key)
}

// fileInDisk returns the content of a file in an ext4 disk, read with
// debugfs, and whether the disk has it.
func fileInDisk(disk, name string) (string, bool, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("debugfs", "-R", "cat "+name, disk)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", false, fmt.Errorf("debugfs %s: %w: %s", disk, err, stderr.String())
	}
	if strings.Contains(stderr.String(), "File not found") {
		return "", false, nil
	}
	return stdout.String(), true, nil
}

// TestStagedTreesUnderEviction stores two-layer chains from several
// goroutines at once with room for one staged tree, so that trees are
// evicted all the time, and builds the disk of each chain's first layer
// while its second layer takes the tree over and changes it. Every disk
// must hold its own chain's files and nothing of a child layer.
func TestStagedTreesUnderEviction(t *testing.T) {
	needE2fsprogs(t)
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "test"), 2*time.Minute)
	defer cancel()
	sn, err := New(ctx, Config{Root: t.TempDir(), DefaultSize: 16 << 20, MaxBuilds: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	sn.staged.limit = 1

	// check fails unless the disk of a view of snapshot name has /etc/a
	// holding a and /etc/b holding b ("" for no such file).
	check := func(name, a, b string) error {
		mounts, err := sn.View(ctx, "view-"+name, name)
		if err != nil {
			return fmt.Errorf("view of %s: %w", name, err)
		}
		for file, want := range map[string]string{"/etc/a": a, "/etc/b": b} {
			got, ok, err := fileInDisk(mounts[0].Source, file)
			if err != nil {
				return err
			}
			if got != want || ok != (want != "") {
				return fmt.Errorf("the disk of %s: %s holds %q (there: %v), want %q", name, file, got, ok, want)
			}
		}
		return nil
	}
	const goroutines, rounds = 6, 4
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*rounds*2)
	for i := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				lower, upper := fmt.Sprintf("lower-%d-%d", i, r), fmt.Sprintf("upper-%d-%d", i, r)
				if err := stageLayer(ctx, sn, lower, "", map[string]string{"etc/a": lower}); err != nil {
					errs <- err
					return
				}
				var building sync.WaitGroup
				building.Add(1)
				go func() {
					defer building.Done()
					if err := check(lower, lower, ""); err != nil {
						errs <- err
					}
				}()
				if err := stageLayer(ctx, sn, upper, lower, map[string]string{"etc/b": upper}); err != nil {
					errs <- err
				} else if err := check(upper, lower, upper); err != nil {
					errs <- err
				}
				building.Wait()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestStagedTreeKeptWhileBuilding: a layer stored right after another
// evicts its staged tree (there is room for one) just as the other's disk
// build has found the tree. The build must keep the tree until it is done,
// or build from the stored layers: it may not read a released tree.
func TestStagedTreeKeptWhileBuilding(t *testing.T) {
	needE2fsprogs(t)
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "test"), time.Minute)
	defer cancel()
	sn, err := New(ctx, Config{Root: t.TempDir(), DefaultSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	sn.staged.limit = 1
	if err := stageLayer(ctx, sn, "image", "", map[string]string{"etc/name": "image\n"}); err != nil {
		t.Fatal(err)
	}
	id, err := sn.committedID(ctx, "image")
	if err != nil {
		t.Fatal(err)
	}
	sn.staged.mu.Lock()
	tree := sn.staged.byID[id]
	sn.staged.mu.Unlock()
	if tree == nil {
		t.Fatal("the stored layer has no staged tree")
	}

	evicted := false
	sn.staged.afterRead = func(got string) {
		if got != id || evicted {
			return
		}
		evicted = true
		if err := stageLayer(ctx, sn, "next", "", map[string]string{"etc/name": "next\n"}); err != nil {
			t.Error(err)
			return
		}
		// Wait until the evicted tree is deleted, or its deletion waits
		// for the build.
		for exists(tree.wd.Path) && tree.mu.TryRLock() {
			tree.mu.RUnlock()
			time.Sleep(time.Millisecond)
		}
	}
	view, err := sn.View(ctx, "view", "image")
	if err != nil {
		t.Fatalf("building the disk while its staged tree is evicted: %v", err)
	}
	if !evicted {
		t.Fatal("the build did not use the staged tree")
	}
	out, err := exec.Command("debugfs", "-R", "cat /etc/name", view[0].Source).Output()
	if err != nil || string(out) != "image\n" {
		t.Errorf("the disk's /etc/name: %q, %v", out, err)
	}
	// The evicted tree goes once the build is done.
	deadline := time.Now().Add(10 * time.Second)
	for exists(tree.wd.Path) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if exists(tree.wd.Path) {
		t.Errorf("the evicted tree %s is still there after the build", tree.wd.Path)
	}
}
