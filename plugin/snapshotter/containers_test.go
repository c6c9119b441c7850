package snapshotter

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/testenv"
)

// storeLayer does what kiln's differ does for an extraction snapshot:
// stores the layer tar and its diffID in the snapshot's directory.
func storeLayer(t *testing.T, sn *Snapshotter, key, parent string, files map[string]string) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	if _, _, err := writeLayer(ctx, sn, key, parent, files); err != nil {
		t.Fatal(err)
	}
}

// storeLayerTar is storeLayer for a layer tar as given.
func storeLayerTar(t *testing.T, sn *Snapshotter, key, parent string, layerTar []byte) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	if _, err := writeLayerTar(ctx, sn, key, parent, layerTar); err != nil {
		t.Fatal(err)
	}
}

// writeLayer prepares extraction snapshot key and stores in it a layer
// of files, as kiln's differ does; it returns the snapshot's directory
// and the layer tar.
func writeLayer(ctx context.Context, sn *Snapshotter, key, parent string, files map[string]string) (string, []byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, body := range files {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), ModTime: time.Unix(1e9, 0)})
		tw.Write([]byte(body))
	}
	tw.Close()
	dir, err := writeLayerTar(ctx, sn, key, parent, buf.Bytes())
	return dir, buf.Bytes(), err
}

// writeLayerTar is writeLayer for a layer tar as given.
func writeLayerTar(ctx context.Context, sn *Snapshotter, key, parent string, layerTar []byte) (string, error) {
	dir, err := prepareExtraction(ctx, sn, key, parent)
	if err != nil {
		return "", err
	}
	_, err = sn.StoreLayer(ctx, dir, bytes.NewReader(layerTar), key, fstree.Limits{}, false, func() (digest.Digest, error) {
		return digest.FromBytes(layerTar), nil
	})
	return dir, err
}

// writeOldLayerTar is writeLayerTar as earlier kilns stored every layer:
// as its uncompressed tar.
func writeOldLayerTar(ctx context.Context, sn *Snapshotter, key, parent string, tarball []byte) (string, error) {
	dir, err := prepareExtraction(ctx, sn, key, parent)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, layerTar), tarball, 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, diffIDFile), []byte(digest.FromBytes(tarball).String()), 0o600); err != nil {
		return "", err
	}
	return dir, nil
}

// prepareExtraction prepares extraction snapshot key, as containerd's
// unpacker does, and returns its directory.
func prepareExtraction(ctx context.Context, sn *Snapshotter, key, parent string) (string, error) {
	mounts, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "chain"}))
	if err != nil {
		return "", err
	}
	dir, ok := sn.ExtractionDir(mounts)
	if !ok {
		return "", fmt.Errorf("extraction mounts %v are not recognised as kiln's", mounts)
	}
	return dir, nil
}

func needE2fsprogs(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mke2fs", "debugfs", "resize2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, "%s not installed (e2fsprogs)", tool)
		}
	}
}

// newCommittedBase makes a snapshotter with one committed layer, "base".
func newCommittedBase(t *testing.T, cfg Config) (*Snapshotter, context.Context) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	if cfg.Root == "" {
		cfg.Root = t.TempDir()
	}
	sn, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	storeLayer(t, sn, "extract-1 base", "", map[string]string{"etc/hello": "world\n"})
	if err := sn.Commit(ctx, "base", "extract-1 base"); err != nil {
		t.Fatal(err)
	}
	return sn, ctx
}

func sizeOf(t *testing.T, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestOverlayContainers: in overlay mode (the default) a container is a
// small scratch disk of its own over the image's shared disk, in the
// mount form containerd's mount manager assembles.
func TestOverlayContainers(t *testing.T) {
	needE2fsprogs(t)
	sn, ctx := newCommittedBase(t, Config{DefaultSize: 256 << 20})
	view, err := sn.View(ctx, "view", "base")
	if err != nil {
		t.Fatal(err)
	}
	if len(view) != 1 || view[0].Type != "ext4" || !strings.HasSuffix(view[0].Source, "/"+diskFile) || view[0].Options[0] != "ro" {
		t.Errorf("a view is the disk read-only: %+v", view)
	}
	disk := view[0].Source

	mounts, err := sn.Prepare(ctx, "c1", "base")
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 3 {
		t.Fatalf("overlay container mounts: %+v", mounts)
	}
	scratch, lower, ovl := mounts[0], mounts[1], mounts[2]
	if scratch.Type != "format/ext4" || !strings.HasSuffix(scratch.Source, "/"+scratchFile) || scratch.Options[0] != "rw" {
		t.Errorf("mount 0 is the scratch disk, writable: %+v", scratch)
	}
	if lower.Type != "ext4" || lower.Source != disk || lower.Options[0] != "ro" {
		t.Errorf("mount 1 is the shared disk, read-only: %+v", lower)
	}
	wantOpts := []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
		"X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"upperdir={{ mount 0 }}/upper",
		"workdir={{ mount 0 }}/work",
		"lowerdir={{ mount 1 }}",
	}
	if ovl.Type != "format/mkdir/overlay" || strings.Join(ovl.Options, " ") != strings.Join(wantOpts, " ") {
		t.Errorf("mount 2: %+v", ovl)
	}
	if got := sizeOf(t, scratch.Source); got != 256<<20 {
		t.Errorf("scratch disk of %d bytes, want the default size", got)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(scratch.Source, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("a new container takes %d KiB of disk, want at most 1 MiB", used>>10)
	}
	if out, err := exec.Command("debugfs", "-R", "stats", scratch.Source).CombinedOutput(); err != nil ||
		!strings.Contains(string(out), "Filesystem volume name:   kiln-scratch") {
		t.Errorf("scratch disk label: %v\n%s", err, out)
	}

	sized, err := sn.Prepare(ctx, "c2", "base", snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotMaxSize: strconv.Itoa(64 << 20),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if got := sizeOf(t, sized[0].Source); got != 64<<20 {
		t.Errorf("max-size scratch disk is %d bytes, want %d", got, 64<<20)
	}
	// Both containers share the disk; each has its own scratch.
	if sized[1].Source != disk || sized[0].Source == scratch.Source {
		t.Errorf("containers do not share the disk or share a scratch: %+v %+v", mounts, sized)
	}
	if d, ok := sn.ResolveDisks(mounts); !ok || d.Disk != disk || d.Scratch != scratch.Source {
		t.Errorf("ResolveDisks(overlay container) = %+v, %v", d, ok)
	}
	if _, err := sn.Prepare(ctx, "c3", "base", snapshots.WithLabels(map[string]string{
		LabelContainerMode: "fancy",
	})); !errdefs.IsInvalidArgument(err) {
		t.Errorf("an unknown container mode: %v, want invalid argument", err)
	}
}

// TestCopyContainers: a copy-mode container (by label, or configured) is
// one writable copy of the disk, sized as the disk or as max-size says.
func TestCopyContainers(t *testing.T) {
	needE2fsprogs(t)
	sn, ctx := newCommittedBase(t, Config{})
	view, err := sn.View(ctx, "view", "base")
	if err != nil {
		t.Fatal(err)
	}
	diskSize := sizeOf(t, view[0].Source)
	copyMode := func(more map[string]string) snapshots.Opt {
		labels := map[string]string{LabelContainerMode: ModeCopy}
		for k, v := range more {
			labels[k] = v
		}
		return snapshots.WithLabels(labels)
	}

	plain, err := sn.Prepare(ctx, "c1", "base", copyMode(nil))
	if err != nil {
		t.Fatal(err)
	}
	if len(plain) != 1 || plain[0].Type != "format/ext4" || !strings.HasSuffix(plain[0].Source, "/"+containerFile) ||
		plain[0].Options[0] != "rw" {
		t.Errorf("copy-mode container: %+v", plain)
	}
	if got := sizeOf(t, plain[0].Source); got != diskSize {
		t.Errorf("container: %d bytes, want the disk's %d", got, diskSize)
	}
	if d, ok := sn.ResolveDisks(plain); !ok || d.Container != plain[0].Source {
		t.Errorf("ResolveDisks(copy container) = %+v, %v", d, ok)
	}

	const want = 3 << 30
	grown, err := sn.Prepare(ctx, "c2", "base", copyMode(map[string]string{
		snapshots.LabelSnapshotMaxSize: strconv.Itoa(want),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if got := sizeOf(t, grown[0].Source); got != want {
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

	if _, err := sn.Prepare(ctx, "c3", "base", copyMode(map[string]string{
		snapshots.LabelSnapshotMaxSize: "4096",
	})); err == nil {
		t.Errorf("a max-size too small for the image should fail")
	}
	if _, err := sn.Stat(ctx, "c3"); err == nil {
		t.Errorf("the failed Prepare left a snapshot")
	}
	if ents, _ := os.ReadDir(filepath.Join(sn.root, tmpDir)); len(ents) != 0 {
		t.Errorf("work directories left: %v", ents)
	}

	// Configured as the default mode.
	sn2, ctx2 := newCommittedBase(t, Config{ContainerMode: ModeCopy})
	m, err := sn2.Prepare(ctx2, "c", "base")
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !strings.HasSuffix(m[0].Source, "/"+containerFile) {
		t.Errorf("container_mode = copy: %+v", m)
	}
}
