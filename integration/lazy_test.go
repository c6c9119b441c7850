package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"

	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/integration/testregistry"
	"github.com/kilnfs/kiln/internal/chunked"
	"github.com/kilnfs/kiln/internal/share"
	"github.com/kilnfs/kiln/internal/testenv"
)

// lazyMount is a running kiln mount.
type lazyMount struct {
	cmd    *exec.Cmd
	file   string
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan error
}

// mountStats is what kiln mount --json says when it ends.
type mountStats struct {
	Size    int64 `json:"size"`
	Fetched struct {
		Bytes  int64 `json:"fetched_bytes"`
		Chunks int64 `json:"fetched_chunks"`
	} `json:"fetched"`
}

// startMount runs kiln mount IMAGE DIR in the background and waits for
// the file to appear.
func startMount(t *testing.T, env map[string]string, ref, cache string, more ...string) *lazyMount {
	t.Helper()
	needRoot(t, "kiln mount mounts a FUSE filesystem")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Unavailable(t, "FUSE is not available: %v", err)
	}
	dir := t.TempDir()
	cmd := exec.Command(kilnBin, append([]string{"mount", "--json", ref, dir, "--cache-dir", cache}, more...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	return runMount(t, cmd, dir)
}

// runMount starts cmd, a kiln mount --json of an image on dir, and waits
// for the file to appear; it is stopped, if it still runs, when the test
// ends.
func runMount(t testing.TB, cmd *exec.Cmd, dir string) *lazyMount {
	t.Helper()
	m := &lazyMount{cmd: cmd, file: filepath.Join(dir, "rootfs.ext4"), done: make(chan error, 1)}
	m.cmd.Stdout, m.cmd.Stderr = &m.stdout, &m.stderr
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.done <- m.cmd.Wait() }()
	t.Cleanup(func() { m.stop(t) })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(m.file); err == nil {
			return m
		}
		select {
		case err := <-m.done:
			m.done <- err
			t.Fatalf("kiln mount ended: %v\n%s", err, m.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("kiln mount: no %s after 30s\n%s", m.file, m.stderr.String())
		}
	}
}

// stop ends kiln mount and returns what it fetched.
func (m *lazyMount) stop(t testing.TB) mountStats {
	t.Helper()
	var st mountStats
	if m.cmd.ProcessState == nil {
		m.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // it may have ended
	}
	select {
	case err := <-m.done:
		m.done <- err
		if err != nil {
			t.Errorf("kiln mount: %v\n%s", err, m.stderr.String())
			return st
		}
	case <-time.After(30 * time.Second):
		m.cmd.Process.Kill() //nolint:errcheck
		t.Fatalf("kiln mount did not stop on SIGTERM\n%s", m.stderr.String())
	}
	if err := json.Unmarshal(m.stdout.Bytes(), &st); err != nil {
		t.Errorf("kiln mount --json: %v: %q", err, m.stdout.String())
	}
	return st
}

// lazyImage is busybox with a file of random bytes nothing reads and an
// /sbin/init that prints marker, the SHA-256 of busybox as the guest
// reads it, runs more (shell lines) and powers off.
func lazyImage(t *testing.T, marker string, unread int, more ...string) v1.Image {
	t.Helper()
	noise := make([]byte, unread)
	rand.Read(noise)
	init := "#!/bin/busybox sh\n/bin/busybox echo " + marker + "\n/bin/busybox sha256sum /bin/busybox\n" +
		strings.Join(append(more, ""), "\n") + "/bin/busybox poweroff -f\n"
	return busyboxImage(t, v1.Config{}, testimage.Layer{Tar: layerTar(t,
		tDir("sbin", 0o755, t1), tFile("sbin/init", 0o755, t1, init),
		tDir("data", 0o755, t1), tFile("data/unread", 0o644, t1, string(noise)))})
}

// chunkIndex is the index of the image file as kiln publishes it cut.
func chunkIndex(t *testing.T, path string) *chunked.Index {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	x, _, err := chunked.Cut(context.Background(), f, t.TempDir(), chunked.DefaultChunkSize, chunked.DefaultPackSize)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// chunkDigests are the distinct chunks of the image file kiln publishes
// as it is cut.
func chunkDigests(t *testing.T, path string) map[digest.Digest]bool {
	t.Helper()
	set := map[digest.Digest]bool{}
	for _, c := range chunkIndex(t, path).Chunks {
		if !c.Hole() {
			set[c.Digest] = true
		}
	}
	return set
}

// TestLazyRootfs: kiln push --chunked publishes an image cut into
// chunks; kiln mount serves it as a file that reads as the image kiln
// convert builds, fetching only what is read; a VM boots from it
// fetching a small part of the image; a second image on the same base
// fetches little more than its own chunks; a chunk the registry serves
// wrong is never served, and a registry that stops answering gives I/O
// errors within the timeout.
func TestLazyRootfs(t *testing.T) {
	reg, err := testregistry.StartWith(testregistry.Options{User: shareUser, Password: sharePassword, Referrers: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	env := map[string]string{"DOCKER_CONFIG": shareDockerConfig(t, reg.Host)}
	auth := remote.WithAuth(&authn.Basic{Username: shareUser, Password: sharePassword})
	dir := t.TempDir()
	publish := func(repo string, img v1.Image) (string, string) {
		t.Helper()
		ref := reg.Host + "/" + repo + ":v1"
		shareWrite(t, ref, img)
		local := filepath.Join(dir, repo+".ext4")
		if res := kiln(t, run{args: convertArgs(ref, local, filepath.Join(dir, "cache-local")), env: env}); res.err != nil {
			t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
		}
		res := kiln(t, run{args: []string{"push", "--chunked", ref, "--cache-dir", filepath.Join(dir, "cache-local")}, env: env})
		if res.err != nil {
			t.Fatalf("kiln push --chunked: %v\n%s", res.err, res.stderr)
		}
		return ref, local
	}
	const unread = 96 << 20 // what a boot reads is a small part of the image
	refA, localA := publish("lazy-a", lazyImage(t, "kiln-lazy-a", unread))

	t.Run("read whole", func(t *testing.T) {
		cache := filepath.Join(t.TempDir(), "cache")
		m := startMount(t, env, refA, cache)
		if got, want := fileSHA(t, m.file), fileSHA(t, localA); got != want {
			t.Errorf("the mounted file is %s, kiln convert's image %s", got, want)
		}
		if fi, err := os.Stat(m.file); err != nil || fi.Mode().Perm()&0o222 != 0 {
			t.Errorf("the mounted file: %v, mode %v: want read-only", err, fi.Mode())
		}
		st := m.stop(t)
		t.Logf("read whole: fetched %d chunks, %d bytes of an image of %d", st.Fetched.Chunks, st.Fetched.Bytes, st.Size)
		want := len(chunkDigests(t, localA))
		if st.Fetched.Chunks != int64(want) {
			t.Errorf("fetched %d chunks, want each of the %d distinct ones once", st.Fetched.Chunks, want)
		}
		// kiln cache lists the chunks and prunes them with the rest.
		var list struct {
			Chunks struct{ Count, Allocated int64 }
		}
		res := kiln(t, run{args: []string{"cache", "ls", "--json", "--cache-dir", cache}})
		if res.err != nil || json.Unmarshal([]byte(res.stdout), &list) != nil {
			t.Fatalf("kiln cache ls: %v\n%s%s", res.err, res.stdout, res.stderr)
		}
		if list.Chunks.Count != int64(want) || list.Chunks.Allocated <= 0 {
			t.Errorf("kiln cache ls shows %+v, want the %d chunks cached", list.Chunks, want)
		}
		res = kiln(t, run{args: []string{"cache", "prune", "--all", "--json", "--cache-dir", cache}})
		if res.err != nil || json.Unmarshal([]byte(res.stdout), &list) != nil || list.Chunks.Count != int64(want) {
			t.Errorf("kiln cache prune --all: %v, removed %+v, want the %d chunks\n%s%s", res.err, list.Chunks, want, res.stdout, res.stderr)
		}
		if left, _ := os.ReadDir(filepath.Join(cache, "chunks", "sha256")); len(left) != 0 {
			t.Errorf("%d chunks left after kiln cache prune --all", len(left))
		}
	})

	kernel := needBoot(t)
	cache := filepath.Join(t.TempDir(), "cache")
	t.Run("boot", func(t *testing.T) {
		m := startMount(t, env, refA, cache)
		_, _, console := bootWith(t, kernel, m.file, nil)
		st := m.stop(t)
		if !strings.Contains(console, "kiln-lazy-a") {
			t.Errorf("the guest did not print its marker:\n%s", tailLines(console, 30))
		}
		// What the guest read is what kiln built.
		dir, err := testimage.Busybox()
		if err != nil {
			t.Fatal(err)
		}
		if want := fileSHA(t, filepath.Join(dir, "bin", "busybox")); !strings.Contains(console, want+"  /bin/busybox") {
			t.Errorf("the guest did not read busybox as %s:\n%s", want, tailLines(console, 30))
		}
		t.Logf("boot: fetched %d chunks, %d bytes of an image of %d", st.Fetched.Chunks, st.Fetched.Bytes, st.Size)
		if st.Fetched.Bytes == 0 || st.Fetched.Bytes > st.Size/10 {
			t.Errorf("the boot fetched %d bytes of an image of %d, want some and at most 10%%", st.Fetched.Bytes, st.Size)
		}
		if profiles, _ := filepath.Glob(filepath.Join(cache, "profiles", "*.json")); len(profiles) != 1 {
			t.Errorf("boot profiles recorded: %v, want one", profiles)
		}
	})

	t.Run("second image", func(t *testing.T) {
		refB, localB := publish("lazy-b", lazyImage(t, "kiln-lazy-b", unread))
		cached := map[string]bool{}
		ents, _ := os.ReadDir(filepath.Join(cache, "chunks", "sha256"))
		for _, e := range ents {
			cached[e.Name()] = true
		}
		m := startMount(t, env, refB, cache)
		_, _, console := bootWith(t, kernel, m.file, nil)
		st := m.stop(t)
		if !strings.Contains(console, "kiln-lazy-b") {
			t.Errorf("the guest did not print its marker:\n%s", tailLines(console, 30))
		}
		// What the boot read, from its recorded profile: each chunk not
		// in the cache is fetched once; the rest, the first image's
		// chunks of the shared base among them, never.
		x := chunkIndex(t, localB)
		raw, err := os.ReadFile(filepath.Join(cache, "profiles", lazyKey(t, m)+".json"))
		if err != nil {
			t.Fatal(err)
		}
		var profile struct{ Chunks []int }
		if err := json.Unmarshal(raw, &profile); err != nil {
			t.Fatal(err)
		}
		read, shared := map[digest.Digest]bool{}, 0
		for _, i := range profile.Chunks {
			if c := x.Chunks[i]; !c.Hole() && !read[c.Digest] {
				read[c.Digest] = true
				if cached[c.Digest.Encoded()] {
					shared++
				}
			}
		}
		own := chunkDigests(t, localB)
		for d := range chunkDigests(t, localA) {
			delete(own, d)
		}
		t.Logf("second image: read %d distinct chunks, %d of them cached from the first image; fetched %d; %d of its chunks are not the first's",
			len(read), shared, st.Fetched.Chunks, len(own))
		// Sequential reads fetch a window ahead, so more than was read
		// may come, but never more than the image's own chunks allow.
		if limit := int64(len(own) + len(own)/10); st.Fetched.Chunks > limit {
			t.Errorf("fetched %d chunks, more than its own %d plus 10%%", st.Fetched.Chunks, len(own))
		}
		if shared == 0 {
			t.Errorf("the second image's boot read none of the first image's chunks: the base's chunks are not shared")
		}
	})

	t.Run("tampered chunk", func(t *testing.T) {
		refT, _ := publish("lazy-t", lazyImage(t, "kiln-lazy-t", 1<<20))
		// The registry serves other bytes for every pack of the artifact.
		for _, p := range packsOf(t, refT, auth) {
			reg.ServeBlob(p.Digest.String(), bytes.Repeat([]byte{0x28, 0xb5, 0x2f, 0xfd}, int(p.Size/4)+1)[:p.Size])
		}
		cache := filepath.Join(t.TempDir(), "cache")
		m := startMount(t, env, refT, cache, "--timeout", "10s")
		_, err := os.ReadFile(m.file)
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("reading an image whose chunks do not verify: %v, want an I/O error", err)
		}
		m.stop(t)
		if left, _ := os.ReadDir(filepath.Join(cache, "chunks", "sha256")); len(left) != 0 {
			t.Errorf("%d chunks that did not verify were cached", len(left))
		}
	})

	t.Run("registry stalls mid-boot", func(t *testing.T) {
		// The guest says it is about to read, and waits for the test to
		// stall the registry; the file is larger than any window a read
		// fetches ahead.
		refS, _ := publish("lazy-s", lazyImage(t, "kiln-lazy-s", 32<<20,
			"/bin/busybox echo kiln-lazy-reading",
			"/bin/busybox sleep 2",
			"/bin/busybox md5sum /data/unread && /bin/busybox echo kiln-lazy-read-ok || /bin/busybox echo kiln-lazy-read-failed"))
		m := startMount(t, env, refS, filepath.Join(t.TempDir(), "cache"), "--timeout", "3s")
		var release func()
		var reading, failed time.Time
		console := bootWatch(t, kernel, m.file, func(line string) bool {
			if strings.Contains(line, "kiln-lazy-reading") && release == nil {
				release, reading = reg.Stall(), time.Now()
			}
			if strings.Contains(line, "kiln-lazy-read-failed") {
				failed = time.Now()
			}
			return false
		})
		if release != nil {
			release()
		}
		m.stop(t)
		switch {
		case reading.IsZero():
			t.Fatalf("the guest did not start reading:\n%s", tailLines(console, 30))
		case failed.IsZero() || !strings.Contains(console, "Input/output error"):
			t.Errorf("with the registry stalled, the guest's read did not fail with an I/O error:\n%s", tailLines(console, 30))
		case failed.Sub(reading) > 30*time.Second:
			t.Errorf("the guest's read failed %v after the registry stalled: each read should give up after the 3s timeout", failed.Sub(reading))
		}
		if i := strings.Index(console, "kiln-lazy-read-failed"); i >= 0 {
			t.Logf("the guest's read failed %v after the registry stalled: %s", failed.Sub(reading).Round(time.Millisecond), strings.TrimSpace(console[max(0, i-300):i]))
		}
	})

	t.Run("registry hangs", func(t *testing.T) {
		refH, _ := publish("lazy-h", lazyImage(t, "kiln-lazy-h", 1<<20))
		m := startMount(t, env, refH, filepath.Join(t.TempDir(), "cache"), "--timeout", "3s")
		// The registry sends half of what is asked and stops answering.
		for _, p := range packsOf(t, refH, auth) {
			h := reg.HoldBlob(p.Digest.String())
			defer h.Release()
		}
		start := time.Now()
		_, err := os.ReadFile(m.file)
		took := time.Since(start)
		if !errors.Is(err, syscall.EIO) || took > 15*time.Second {
			t.Errorf("reading while the registry hangs: %v after %v, want an I/O error after about the 3s timeout", err, took)
		}
		m.stop(t)
	})
}

// packsOf lists the packs of the chunked rootfs published beside ref.
func packsOf(t *testing.T, ref string, auth remote.Option) []chunked.Pack {
	t.Helper()
	repo, im := referrersOf(t, ref, auth)
	var packs []chunked.Pack
	for _, d := range im.Manifests {
		if _, cut := d.Annotations[share.AnnotationChunkSize]; !cut {
			continue
		}
		m, err := remote.Get(repo.Digest(d.Digest.String()), auth)
		if err != nil {
			t.Fatal(err)
		}
		var mf struct {
			Layers []struct {
				MediaType string        `json:"mediaType"`
				Digest    digest.Digest `json:"digest"`
				Size      int64         `json:"size"`
			} `json:"layers"`
		}
		if err := json.Unmarshal(m.Manifest, &mf); err != nil {
			t.Fatal(err)
		}
		for _, l := range mf.Layers {
			if l.MediaType == chunked.PackMediaType {
				packs = append(packs, chunked.Pack{Digest: l.Digest, Size: l.Size})
			}
		}
	}
	if len(packs) == 0 {
		t.Fatalf("no chunked rootfs beside %s", ref)
	}
	return packs
}

// lazyKey is the build key kiln mount reports.
func lazyKey(t *testing.T, m *lazyMount) string {
	t.Helper()
	var out struct{ Key string }
	if err := json.Unmarshal(m.stdout.Bytes(), &out); err != nil || out.Key == "" {
		t.Fatalf("kiln mount --json has no key: %v: %q", err, m.stdout.String())
	}
	return out.Key
}

// bootWatch boots image with kiln boot, calling seen with each console
// line as it comes, and returns the console. seen returning true stops
// the VM there.
func bootWatch(t testing.TB, kernel, image string, seen func(line string) bool) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kilnBin, "boot", image, "--kernel", kernel, "--cache-dir", t.TempDir(), "--timeout", "3m")
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait() //nolint:errcheck // the console says how it went
	var console strings.Builder
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		console.WriteString(sc.Text() + "\n")
		if seen(sc.Text()) {
			cancel()
			break
		}
	}
	return console.String()
}
