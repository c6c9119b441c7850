package initconfig

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/guest"
)

// newRoot builds a small image root filesystem:
//
//	/bin/app, /bin/sh       executables
//	/bin/data               not executable
//	/usr/bin -> /bin        absolute symlink, resolved inside the root
//	/sbin/tool -> ../bin/app
//	/srv/run.sh             executable, for relative paths
func newRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	write := func(name, content string, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	symlink := func(target, name string) {
		t.Helper()
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	write("etc/passwd", strings.Join([]string{
		"# comment",
		"root:x:0:0:root:/root:/bin/sh",
		"app:x:1000:1000:App:/home/app:/bin/sh",
		"svc:x:200:300:Service:/var/lib/svc:/sbin/nologin",
	}, "\n")+"\n", 0o644)
	write("etc/group", strings.Join([]string{
		"root:x:0:",
		"wheel:x:10:app",
		"audio:x:29:other,app",
		"app:x:1000:",
		"svc:x:300:",
	}, "\n")+"\n", 0o644)
	write("bin/app", "#!/bin/sh\n", 0o755)
	write("bin/sh", "#!/bin/sh\n", 0o755)
	write("bin/data", "data\n", 0o644)
	write("srv/run.sh", "#!/bin/sh\n", 0o755)
	if err := os.MkdirAll(filepath.Join(root, "bin/subdir"), 0o755); err != nil {
		t.Fatal(err)
	}
	symlink("/bin", "usr/bin")
	symlink("../bin/app", "sbin/tool")
	return root
}

func TestResolveArgv(t *testing.T) {
	root := newRoot(t)
	for _, tc := range []struct {
		name     string
		cfg      v1.ImageConfig
		args     []string
		wantArgs []string
	}{
		{
			name:     "entrypoint and cmd",
			cfg:      v1.ImageConfig{Entrypoint: []string{"app", "--serve"}, Cmd: []string{"--port", "80"}},
			wantArgs: []string{"app", "--serve", "--port", "80"},
		},
		{
			name:     "cmd only",
			cfg:      v1.ImageConfig{Cmd: []string{"sh", "-c", "echo hi"}},
			wantArgs: []string{"sh", "-c", "echo hi"},
		},
		{
			name:     "arguments replace cmd but keep entrypoint",
			cfg:      v1.ImageConfig{Entrypoint: []string{"app"}, Cmd: []string{"--default"}},
			args:     []string{"--custom", "x"},
			wantArgs: []string{"app", "--custom", "x"},
		},
		{
			name:     "arguments without entrypoint",
			cfg:      v1.ImageConfig{Cmd: []string{"app"}},
			args:     []string{"tool", "-v"},
			wantArgs: []string{"tool", "-v"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Resolve(tc.cfg, root, tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(p.Args, tc.wantArgs) {
				t.Errorf("Args = %q, want %q", p.Args, tc.wantArgs)
			}
		})
	}
}

func TestResolvePathLookup(t *testing.T) {
	root := newRoot(t)
	for _, tc := range []struct {
		argv0, pathEnv, dir, want string
	}{
		// /usr/local/bin does not exist; /usr/bin is a symlink to /bin
		// that must be resolved inside the root, not on the host.
		{"app", "", "", "/usr/bin/app"},
		{"tool", "", "", "/sbin/tool"},
		{"app", "PATH=/bin", "", "/bin/app"},
		{"/bin/app", "", "", "/bin/app"},
		{"./run.sh", "", "/srv", "/srv/run.sh"},
		{"run.sh", "PATH=/nowhere::/bin", "/srv", "/srv/run.sh"}, // empty entry = working dir
		// A non-executable match is skipped when a later one works.
		{"data", "PATH=/bin:/srv", "", ""},
	} {
		cfg := v1.ImageConfig{Cmd: []string{tc.argv0}, WorkingDir: tc.dir}
		if tc.pathEnv != "" {
			cfg.Env = []string{tc.pathEnv}
		}
		p, err := Resolve(cfg, root, nil)
		if tc.want == "" {
			if ExitStatus(err) != StatusNotExecutable {
				t.Errorf("%s with %s: err = %v (status %d), want status 126", tc.argv0, tc.pathEnv, err, ExitStatus(err))
			}
			continue
		}
		if err != nil {
			t.Errorf("%s with %q: %v", tc.argv0, tc.pathEnv, err)
			continue
		}
		if p.Path != tc.want {
			t.Errorf("%s with %q: Path = %s, want %s", tc.argv0, tc.pathEnv, p.Path, tc.want)
		}
	}
}

func TestResolveErrors(t *testing.T) {
	root := newRoot(t)
	for _, tc := range []struct {
		name       string
		cfg        v1.ImageConfig
		wantStatus int
		wantText   string
	}{
		{"no command", v1.ImageConfig{}, 1, "no Entrypoint or Cmd"},
		{"empty argv0", v1.ImageConfig{Cmd: []string{""}}, 1, "no Entrypoint or Cmd"},
		{"missing in PATH", v1.ImageConfig{Cmd: []string{"nope"}}, 127, `"nope" not found in PATH`},
		{"missing absolute", v1.ImageConfig{Cmd: []string{"/bin/nope"}}, 127, "/bin/nope not found"},
		{"not executable", v1.ImageConfig{Cmd: []string{"/bin/data"}}, 126, "not executable"},
		{"directory", v1.ImageConfig{Cmd: []string{"/bin/subdir"}}, 126, "is a directory"},
		{"path through a file", v1.ImageConfig{Cmd: []string{"/bin/app/x"}}, 126, "/bin/app/x"},
		{"unknown user", v1.ImageConfig{Cmd: []string{"app"}, User: "ghost"}, 1, `image user "ghost"`},
		{"unknown group", v1.ImageConfig{Cmd: []string{"app"}, User: "app:ghosts"}, 1, "ghosts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Resolve(tc.cfg, root, nil)
			if err == nil {
				t.Fatal("Resolve succeeded, want an error")
			}
			if got := ExitStatus(err); got != tc.wantStatus {
				t.Errorf("ExitStatus = %d, want %d (err: %v)", got, tc.wantStatus, err)
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("error %q does not mention %q", err, tc.wantText)
			}
		})
	}
}

func TestResolveUser(t *testing.T) {
	root := newRoot(t)
	for _, tc := range []struct {
		spec     string
		uid, gid uint32
		groups   []uint32
		home     string
	}{
		{spec: "", uid: 0, gid: 0, home: "/root"},
		{spec: "root", uid: 0, gid: 0, home: "/root"},
		{spec: "app", uid: 1000, gid: 1000, groups: []uint32{10, 29}, home: "/home/app"},
		{spec: "1000", uid: 1000, gid: 1000, groups: []uint32{10, 29}, home: "/home/app"},
		{spec: "app:wheel", uid: 1000, gid: 10, home: "/home/app"},
		{spec: "app:4242", uid: 1000, gid: 4242, home: "/home/app"},
		{spec: "1000:29", uid: 1000, gid: 29, home: "/home/app"},
		{spec: "200:app", uid: 200, gid: 1000, home: "/var/lib/svc"},
		{spec: "svc", uid: 200, gid: 300, home: "/var/lib/svc"},
		// A numeric uid without a passwd entry is allowed and gets gid 0.
		{spec: "4242", uid: 4242, gid: 0, home: "/"},
		{spec: "4242:4343", uid: 4242, gid: 4343, home: "/"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			p, err := Resolve(v1.ImageConfig{Cmd: []string{"app"}, User: tc.spec}, root, nil)
			if err != nil {
				t.Fatal(err)
			}
			if p.UID != tc.uid || p.GID != tc.gid {
				t.Errorf("uid:gid = %d:%d, want %d:%d", p.UID, p.GID, tc.uid, tc.gid)
			}
			if len(p.Groups) != 0 || len(tc.groups) != 0 {
				if !reflect.DeepEqual(p.Groups, tc.groups) {
					t.Errorf("Groups = %v, want %v", p.Groups, tc.groups)
				}
			}
			if p.Home != tc.home {
				t.Errorf("Home = %q, want %q", p.Home, tc.home)
			}
			if got := envValue(p.Env, "HOME"); got != tc.home {
				t.Errorf("HOME = %q, want %q", got, tc.home)
			}
		})
	}
}

func TestResolveUserWithoutAccountFiles(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/app"), nil, 0o755); err != nil {
		t.Fatal(err)
	}
	// Distroless-style images may have no /etc/passwd at all.
	p, err := Resolve(v1.ImageConfig{Cmd: []string{"/bin/app"}, User: "65532:65532"}, root, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.UID != 65532 || p.GID != 65532 || p.Home != "/" {
		t.Errorf("got %d:%d home %q", p.UID, p.GID, p.Home)
	}
	if _, err := Resolve(v1.ImageConfig{Cmd: []string{"/bin/app"}, User: "nonroot"}, root, nil); ExitStatus(err) != 1 {
		t.Errorf("named user without /etc/passwd: err = %v, want status 1", err)
	}
}

func TestResolveEnvAndDir(t *testing.T) {
	root := newRoot(t)
	p, err := Resolve(v1.ImageConfig{Cmd: []string{"app"}, User: "app"}, root, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"PATH=" + DefaultPath, "HOME=/home/app", "TERM=linux"}
	if !reflect.DeepEqual(p.Env, want) {
		t.Errorf("Env = %q, want %q", p.Env, want)
	}
	if p.Dir != "/" {
		t.Errorf("Dir = %q, want /", p.Dir)
	}

	p, err = Resolve(v1.ImageConfig{
		Cmd:        []string{"app"},
		Env:        []string{"PATH=/bin", "HOME=/data", "TERM=xterm", "LANG=C.UTF-8"},
		WorkingDir: "srv/",
	}, root, nil)
	if err != nil {
		t.Fatal(err)
	}
	want = []string{"PATH=/bin", "HOME=/data", "TERM=xterm", "LANG=C.UTF-8"}
	if !reflect.DeepEqual(p.Env, want) {
		t.Errorf("image Env must be kept as is: Env = %q, want %q", p.Env, want)
	}
	if p.Dir != "/srv" {
		t.Errorf("Dir = %q, want /srv", p.Dir)
	}
}

func TestLoad(t *testing.T) {
	root := newRoot(t)
	if err := os.MkdirAll(filepath.Join(root, guest.Dir), 0o755); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(root, guest.ImageConfigPath)

	// A missing config is an error with status 1 that names the file.
	_, err := Load(root, nil)
	if ExitStatus(err) != 1 || !strings.Contains(err.Error(), "image-config.json") {
		t.Errorf("missing config: err = %v (status %d)", err, ExitStatus(err))
	}

	// The empty placeholder of a disk shared by images: said so, unless
	// the kernel command line gives the command.
	if err := os.WriteFile(cfgPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(root, nil); !errors.Is(err, ErrNoImageConfig) || ExitStatus(err) != 1 {
		t.Errorf("empty config: err = %v", err)
	}
	if p, err := Load(root, []string{"/bin/app", "x"}); err != nil || p.Path != "/bin/app" {
		t.Errorf("empty config with a command: %+v, %v", p, err)
	}

	if err := os.WriteFile(cfgPath, []byte(`{"config": {"Cmd": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(root, nil); ExitStatus(err) != 1 || !strings.Contains(err.Error(), "parse image config") {
		t.Errorf("malformed config: err = %v", err)
	}

	doc := `{"architecture":"amd64","os":"linux","config":{"User":"app","Env":["A=1"],` +
		`"Entrypoint":["/bin/app"],"Cmd":["serve"],"WorkingDir":"/srv"},` +
		`"rootfs":{"type":"layers","diff_ids":[]}}`
	if err := os.WriteFile(cfgPath, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := Load(root, []string{"check"})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(p.Args, []string{"/bin/app", "check"}) || p.Path != "/bin/app" ||
		p.UID != 1000 || p.Dir != "/srv" || envValue(p.Env, "A") != "1" {
		t.Errorf("Load = %+v", p)
	}
}

func TestHostPathStaysInRoot(t *testing.T) {
	root := t.TempDir()
	mustSymlink := func(target, name string) {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("inside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustSymlink("../../../../../../etc/hostname", "up")
	mustSymlink("/etc/hostname", "abs")
	mustSymlink("loop2", "loop1")
	mustSymlink("loop1", "loop2")

	for _, name := range []string{"/up", "/abs", "/../../etc/hostname"} {
		hp, err := hostPath(root, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := filepath.Join(root, "etc/hostname"); hp != want {
			t.Errorf("hostPath(%s) = %s, want %s", name, hp, want)
		}
	}
	if _, err := hostPath(root, "/loop1"); !errors.Is(err, syscall.ELOOP) {
		t.Errorf("symlink loop: err = %v, want ELOOP", err)
	}
	if _, err := hostPath(root, "/missing/file"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing component: err = %v, want not-exist", err)
	}
}
