// Package integration tests the kiln binary from the outside: real
// images served by a real registry (or written as OCI layouts and docker
// archives), converted by `kiln convert`, and read back with e2fsprogs.
package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/integration/testregistry"
	"github.com/kilnfs/kiln/internal/testenv"
)

var (
	// kilnBin is the kiln binary under test, built once by TestMain.
	kilnBin string
	// reg is the registry every test pushes to.
	reg *testregistry.Registry
	// sharedDir holds the binary and the registry's blobs; everyone may
	// read it, so that kiln can run as an unprivileged user too.
	sharedDir string
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "kiln-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sharedDir = dir
	kilnBin = filepath.Join(dir, "kiln")
	start := time.Now()
	build := exec.Command(goTool(), "build", "-o", kilnBin, "github.com/kilnfs/kiln/cmd/kiln")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building kiln: %v\n%s", err, out)
		return 1
	}
	// The guest pieces go next to kiln, where --inject looks for them.
	for _, pkg := range []string{"kiln-init", "kiln-agent"} {
		build := exec.Command(goTool(), "build", "-o", filepath.Join(dir, pkg), "github.com/kilnfs/kiln/cmd/"+pkg)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", pkg, err, out)
			return 1
		}
	}
	fmt.Fprintf(os.Stderr, "built kiln in %v\n", time.Since(start).Round(time.Millisecond))
	reg, err = testregistry.Start(filepath.Join(dir, "registry"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting registry: %v\n", err)
		return 1
	}
	defer reg.Close()
	return m.Run()
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// run describes one kiln invocation.
type run struct {
	args []string
	// env is added to the minimal environment kiln gets: PATH, HOME and
	// DOCKER_CONFIG, each a fresh empty directory unless given here.
	env  map[string]string
	dir  string
	cred *syscall.Credential
}

type result struct {
	stdout, stderr string
	err            error
	took           time.Duration
}

func kiln(t *testing.T, r run) result {
	t.Helper()
	env := map[string]string{"PATH": os.Getenv("PATH"), "LC_ALL": "C"}
	if _, ok := r.env["HOME"]; !ok {
		env["HOME"] = t.TempDir()
	}
	if _, ok := r.env["DOCKER_CONFIG"]; !ok {
		env["DOCKER_CONFIG"] = t.TempDir()
	}
	for k, v := range r.env {
		env[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kilnBin, r.args...)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Dir = r.dir
	if r.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: r.cred}
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	res := result{stdout: stdout.String(), stderr: stderr.String(), err: err, took: time.Since(start)}
	t.Logf("kiln %s: %v in %v", strings.Join(r.args, " "), errOr(err, "ok"), res.took.Round(time.Millisecond))
	return res
}

func errOr(err error, ok string) string {
	if err == nil {
		return ok
	}
	return err.Error()
}

// summary is kiln convert --json's output.
type summary struct {
	Image     string           `json:"image"`
	Digest    string           `json:"digest"`
	Platform  string           `json:"platform"`
	ChainID   string           `json:"chain_id"`
	Size      int64            `json:"size"`
	Path      string           `json:"path"`
	Cached    bool             `json:"cached"`
	Fetched   bool             `json:"fetched"`
	Published string           `json:"published"`
	Init      string           `json:"init"`
	Timings   map[string]int64 `json:"timings_ms"`
}

// convert runs kiln convert --json src -o out --cache-dir cache and more
// arguments, and fails the test if it fails.
func convert(t *testing.T, src, out, cache string, more ...string) *summary {
	t.Helper()
	res := kiln(t, run{args: convertArgs(src, out, cache, more...)})
	if res.err != nil {
		t.Fatalf("kiln convert %s: %v\n%s", src, res.err, res.stderr)
	}
	return parseSummary(t, res)
}

func convertArgs(src, out, cache string, more ...string) []string {
	return append([]string{"convert", "--json", src, "-o", out, "--cache-dir", cache}, more...)
}

func parseSummary(t *testing.T, res result) *summary {
	t.Helper()
	var s summary
	if err := json.Unmarshal([]byte(res.stdout), &s); err != nil {
		t.Fatalf("parsing --json output: %v\n%s", err, res.stdout)
	}
	return &s
}

// convertFails runs kiln convert and returns its error output, failing the
// test if it succeeds or leaves the output file behind.
func convertFails(t *testing.T, src, out, cache string, more ...string) string {
	t.Helper()
	res := kiln(t, run{args: convertArgs(src, out, cache, more...)})
	if res.err == nil {
		t.Fatalf("kiln convert %s succeeded, want an error", src)
	}
	t.Logf("error output: %s", strings.TrimSpace(res.stderr))
	assertNotExist(t, out)
	return res.stderr
}

func assertNotExist(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s exists (err %v), want nothing there", path, err)
	}
}

// assertError checks that an error message names the image src and says
// every one of want. want is looked for in the message without the image
// name, which may contain anything (test names end up in temp paths).
func assertError(t *testing.T, msg, src string, want ...string) {
	t.Helper()
	if !strings.Contains(msg, src) {
		t.Errorf("the error does not name the image %q:\n%s", src, msg)
	}
	rest := strings.ReplaceAll(msg, src, "<image>")
	for _, w := range want {
		if !strings.Contains(rest, w) {
			t.Errorf("the error does not say %q:\n%s", w, msg)
		}
	}
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// fsck fails the test unless e2fsck -fn finds the image clean.
func fsck(t *testing.T, image string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", image).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", image, err, out)
	}
}

func needRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "needs root: %s", why)
	}
}

// minbase is the debootstrap minbase image, built and pushed once.
var minbase struct {
	once sync.Once
	tar  string   // the layer tar
	img  v1.Image // one gzip layer
	ref  string   // in reg
	err  error
}

// minbaseRef returns the registry reference of the minbase image.
func minbaseRef(t testing.TB) string {
	t.Helper()
	minbase.once.Do(func() {
		start := time.Now()
		if minbase.tar, minbase.err = testimage.MinbaseTar(); minbase.err != nil {
			return
		}
		minbase.img, minbase.err = testimage.Build(testimage.Image{
			Layers: []testimage.Layer{{File: minbase.tar, Compression: testimage.Gzip}},
			Config: v1.Config{Cmd: []string{"/bin/sh"}},
		})
		if minbase.err != nil {
			return
		}
		minbase.ref = reg.Host + "/minbase:v1"
		minbase.err = testimage.Push(minbase.ref, minbase.img)
		fmt.Fprintf(os.Stderr, "minbase image pushed in %v\n", time.Since(start).Round(time.Millisecond))
	})
	if errors.Is(minbase.err, testimage.ErrNeedRoot) {
		testenv.Unavailable(t, "needs root: the minbase fixture is made with debootstrap and is not cached yet")
	}
	if minbase.err != nil {
		t.Fatalf("minbase fixture: %v", minbase.err)
	}
	return minbase.ref
}

// The functions below write layers by hand. Every entry gets a PAX
// header, uid and gid 0 and the given time unless the test sets them.

type tarEntry struct {
	hdr  tar.Header
	body []byte
}

func tDir(name string, mode int64, mtime time.Time) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: mtime}}
}

func tFile(name string, mode int64, mtime time.Time, body string) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, ModTime: mtime}, body: []byte(body)}
}

func tSymlink(name, target string, mtime time.Time) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: mtime}}
}

func tHardlink(name, target string, mtime time.Time) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: mtime}}
}

func tDevice(name string, typ byte, major, minor int64, mode int64, mtime time.Time) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: typ, Name: name, Mode: mode, Devmajor: major, Devminor: minor, ModTime: mtime}}
}

// tWhiteout is an empty file named .wh.NAME (or .wh..wh..opq) in dir.
func tWhiteout(path string, mtime time.Time) tarEntry {
	return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: path, Mode: 0o644, ModTime: mtime}}
}

func layerTar(t *testing.T, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		hdr := e.hdr
		if hdr.Format == tar.FormatUnknown {
			hdr.Format = tar.FormatPAX
		}
		if hdr.Typeflag == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&hdr); err != nil {
			t.Fatalf("tar header %q: %v", hdr.Name, err)
		}
		if len(e.body) > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// mustPush pushes img to reg as repo:tag and returns the reference.
func mustPush(t testing.TB, repoTag string, img v1.Image) string {
	t.Helper()
	ref := reg.Host + "/" + repoTag
	if err := testimage.Push(ref, img); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

func mustBuild(t testing.TB, spec testimage.Image) v1.Image {
	t.Helper()
	img, err := testimage.Build(spec)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func mustDigest(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// layerDigests lists the blob digests of img's layers.
func layerDigests(t *testing.T, img v1.Image) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d.String())
	}
	return out
}

// blobFetches lists the blob GETs kiln made for repository repo since the
// registry's log had n entries.
func blobFetches(repo string, n int) []string {
	var out []string
	for _, q := range reg.Requests()[n:] {
		if q.Method == "GET" && strings.HasPrefix(q.Path, "/v2/"+repo+"/blobs/") && strings.Contains(q.UserAgent, "kiln") {
			out = append(out, strings.TrimPrefix(q.Path, "/v2/"+repo+"/blobs/"))
		}
	}
	sort.Strings(out)
	return out
}

// sharedTempDir makes a directory that everyone may enter, removed when
// the test ends. t.TempDir's parent is private to root.
func sharedTempDir(t *testing.T, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
