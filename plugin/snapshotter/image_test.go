package snapshotter

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/testenv"
)

// storeLayer does what kiln's differ does for an extraction snapshot:
// stores the layer tar and its diffID in the snapshot's directory.
func storeLayer(t *testing.T, sn *Snapshotter, key, parent string, files map[string]string) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	mounts, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "chain"}))
	if err != nil {
		t.Fatal(err)
	}
	dir, ok := sn.SnapshotDir(mounts[0])
	if !ok {
		t.Fatalf("extraction mounts %v are not recognised as kiln's", mounts)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(1e9, 0)})
		tw.Write([]byte(body))
	}
	tw.Close()
	tarPath, diffIDPath := LayerFiles(dir)
	if err := os.WriteFile(tarPath, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(diffIDPath, []byte(digest.FromBytes(buf.Bytes()).String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestContainerSizes(t *testing.T) {
	for _, tool := range []string{"mke2fs", "debugfs", "resize2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, "%s not installed (e2fsprogs)", tool)
		}
	}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, err := New(ctx, Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	storeLayer(t, sn, "extract-1 base", "", map[string]string{"etc/hello": "world\n"})
	if err := sn.Commit(ctx, "base", "extract-1 base"); err != nil {
		t.Fatal(err)
	}
	size := func(mounts []mount.Mount) int64 {
		t.Helper()
		fi, err := os.Stat(mounts[0].Source)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	view, err := sn.View(ctx, "view", "base")
	if err != nil {
		t.Fatal(err)
	}
	imageSize := size(view)
	if !strings.HasSuffix(view[0].Source, imageFile) || view[0].Options[0] != "ro" {
		t.Errorf("a view is the image read-only: %+v", view[0])
	}

	plain, err := sn.Prepare(ctx, "c1", "base")
	if err != nil {
		t.Fatal(err)
	}
	if got := size(plain); got != imageSize || plain[0].Options[0] != "rw" {
		t.Errorf("container: %d bytes %v, want the image's %d, rw", got, plain[0].Options, imageSize)
	}

	const want = 3 << 30
	grown, err := sn.Prepare(ctx, "c2", "base", snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotMaxSize: strconv.Itoa(want),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if got := size(grown); got != want {
		t.Errorf("max-size container is %d bytes, want %d", got, want)
	}
	out, err := exec.Command("debugfs", "-R", "stats", grown[0].Source).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Block count:              786432") {
		t.Errorf("the filesystem was not grown to max-size: %v\n%s", err, out)
	}
	if out, err := exec.Command("debugfs", "-R", "cat /etc/hello", grown[0].Source).Output(); err != nil || string(out) != "world\n" {
		t.Errorf("content after resize: %q %v", out, err)
	}
	if out, err := exec.Command("e2fsck", "-fn", grown[0].Source).CombinedOutput(); err != nil {
		t.Errorf("e2fsck: %v\n%s", err, out)
	}

	if _, err := sn.Prepare(ctx, "c3", "base", snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotMaxSize: "4096",
	})); err == nil {
		t.Errorf("a max-size too small for the image should fail")
	}
	if _, err := sn.Stat(ctx, "c3"); err == nil {
		t.Errorf("the failed Prepare left a snapshot")
	}
	if ents, _ := os.ReadDir(filepath.Join(sn.root, "tmp")); len(ents) != 0 {
		t.Errorf("build directories left: %v", ents)
	}
}
