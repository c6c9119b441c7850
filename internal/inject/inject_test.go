package inject

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/fstree"
)

func tree(t *testing.T, entries ...*tar.Header) *fstree.Tree {
	t.Helper()
	dir := t.TempDir()
	tr, err := fstree.New(dir, dir+".data", time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range entries {
		h.Format = tar.FormatPAX
		tw.WriteHeader(h)
		if h.Size > 0 {
			tw.Write(bytes.Repeat([]byte("x"), int(h.Size)))
		}
	}
	tw.Close()
	if err := tr.Apply(context.Background(), &buf, "image"); err != nil {
		t.Fatal(err)
	}
	return tr
}

func bundle(t *testing.T, manifest string, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ManifestName), []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

const agentManifest = `
[[entry]]
path = "/opt/agent/agent"
source = "agent"
mode = "0750"
uid = 1000
gid = 1000

[[entry]]
path = "/opt/agent"
type = "dir"
mode = "0711"

[[entry]]
path = "/etc/agent.link"
type = "symlink"
target = "/opt/agent/agent"
`

func TestUserBundle(t *testing.T) {
	dir := bundle(t, agentManifest, map[string]string{"agent": "#!/bin/sh\n"})
	set, err := New(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	tr := tree(t, &tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755})
	if err := set.Apply(context.Background(), tr); err != nil {
		t.Fatal(err)
	}
	a := tr.Lookup("opt/agent/agent").Inode()
	if a.Mode != 0o750 || a.UID != 1000 || a.GID != 1000 || a.Size != int64(len("#!/bin/sh\n")) {
		t.Errorf("agent: %+v", a)
	}
	if d := tr.Lookup("opt/agent").Inode(); d.Mode != 0o711 {
		t.Errorf("opt/agent mode %o", d.Mode)
	}
	if l := tr.Lookup("etc/agent.link").Inode(); l.Type != fstree.TypeSymlink || l.Target() != "/opt/agent/agent" {
		t.Errorf("link: %+v", l)
	}
}

func TestClashNeedsForce(t *testing.T) {
	dir := bundle(t, agentManifest, map[string]string{"agent": "new"})
	existing := &tar.Header{Name: "opt/agent/agent", Typeflag: tar.TypeReg, Mode: 0o755, Size: 3}
	set, _ := New(Options{Dir: dir})
	err := set.Apply(context.Background(), tree(t, existing))
	if !errors.Is(err, ErrClash) || !strings.Contains(err.Error(), "/opt/agent/agent") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("err = %v, want a clash naming the path and --force", err)
	}
	forced, _ := New(Options{Dir: dir, Force: true})
	tr := tree(t, existing)
	if err := forced.Apply(context.Background(), tr); err != nil {
		t.Fatal(err)
	}
	if tr.Lookup("opt/agent/agent").Inode().Size != 3 {
		t.Errorf("forced injection did not replace the file")
	}
	if forced.Fingerprint() == set.Fingerprint() {
		t.Errorf("force must change the fingerprint")
	}
}

func TestBadManifests(t *testing.T) {
	for name, m := range map[string]string{
		"relative path":   "[[entry]]\npath = \"etc/x\"\nsource = \"f\"\n",
		"escaping source": "[[entry]]\npath = \"/etc/x\"\nsource = \"../f\"\n",
		"missing source":  "[[entry]]\npath = \"/etc/x\"\nsource = \"nope\"\n",
		"bad mode":        "[[entry]]\npath = \"/etc/x\"\nsource = \"f\"\nmode = \"999\"\n",
		"bad type":        "[[entry]]\npath = \"/etc/x\"\ntype = \"device\"\n",
		"unknown field":   "[[entry]]\npath = \"/etc/x\"\nsource = \"f\"\nowner = \"root\"\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ReadBundle(bundle(t, m, map[string]string{"f": "x"})); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

func TestHasSystemd(t *testing.T) {
	usrmerge := tree(t,
		&tar.Header{Name: "usr/lib/systemd/", Typeflag: tar.TypeDir, Mode: 0o755},
		&tar.Header{Name: "usr/lib/systemd/systemd", Typeflag: tar.TypeReg, Mode: 0o755, Size: 1},
		&tar.Header{Name: "lib", Typeflag: tar.TypeSymlink, Linkname: "usr/lib"},
	)
	if !HasSystemd(usrmerge) {
		t.Errorf("systemd behind the /lib symlink not found")
	}
	if HasSystemd(tree(t, &tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: 1})) {
		t.Errorf("busybox image has no systemd")
	}
}
