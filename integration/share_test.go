package integration

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"

	"github.com/kilnfs/kiln/integration/testcontainerd"
	"github.com/kilnfs/kiln/integration/testimage"
	"github.com/kilnfs/kiln/integration/testregistry"
	"github.com/kilnfs/kiln/internal/share"
)

const shareUser, sharePassword = "fleet", "s3cret"

// shareRegistry is a registry with basic auth that kiln publishes to.
type shareRegistry struct {
	host string
	// serveBlob, if the registry can, serves other bytes for a blob.
	serveBlob func(digest string, data []byte)
}

// TestPublishedRootfs: kiln push publishes a rootfs beside its image;
// kiln convert with an empty cache on the same options downloads it
// instead of building and gets the same bytes as a local build; an
// artifact that is tampered with (its blob, its image digest, its build
// annotations) or for other options is never used. Each registry kind:
// go-containerregistry's with the referrers API and without it (the
// referrers tag schema), and Debian's docker-registry (tag schema).
func TestPublishedRootfs(t *testing.T) {
	registries := map[string]func(t *testing.T) shareRegistry{
		"referrers-api": func(t *testing.T) shareRegistry { return ggcrRegistry(t, true) },
		"tag-schema":    func(t *testing.T) shareRegistry { return ggcrRegistry(t, false) },
		"docker-registry": func(t *testing.T) shareRegistry {
			return distributionRegistry(t)
		},
	}
	for kind, start := range registries {
		t.Run(kind, func(t *testing.T) {
			reg := start(t)
			env := map[string]string{"DOCKER_CONFIG": shareDockerConfig(t, reg.host)}
			layers := []testimage.Layer{
				{Tar: layerTar(t, tDir("etc", 0o755, t1), tFile("etc/hostname", 0o644, t1, "fleet\n"), tFile("big", 0o644, t1, strings.Repeat("kiln", 300000)))},
				{Tar: layerTar(t, tFile("etc/motd", 0o644, t2, "built once\n"), tSymlink("motd", "etc/motd", t2))},
			}
			img := mustBuild(t, testimage.Image{Layers: layers})
			auth := remote.WithAuth(&authn.Basic{Username: shareUser, Password: sharePassword})
			// push uploads the image, with a layer naming the repository
			// after the others: each repository's rootfs (and blob) is its
			// own.
			push := func(repo string) string {
				ref := reg.host + "/" + repo + ":v1"
				r, err := name.ParseReference(ref)
				if err != nil {
					t.Fatal(err)
				}
				own := img
				if repo != "app" {
					own = mustBuild(t, testimage.Image{Layers: append(layers[:len(layers):len(layers)], testimage.Layer{Tar: layerTar(t, tFile("repo", 0o644, t2, repo))})})
				}
				if err := remote.Write(r, own, auth); err != nil {
					t.Fatal(err)
				}
				return ref
			}
			dir := t.TempDir()
			ref := push("app")

			// What a machine building it itself gets.
			local := filepath.Join(dir, "local.ext4")
			res := kiln(t, run{args: convertArgs(ref, local, filepath.Join(dir, "cache-local"), "--use-published=false"), env: env})
			if res.err != nil {
				t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
			}
			want := fileSHA(t, local)

			res = kiln(t, run{args: []string{"push", "--json", ref, "--cache-dir", filepath.Join(dir, "cache-a")}, env: env})
			if res.err != nil {
				t.Fatalf("kiln push: %v\n%s", res.err, res.stderr)
			}
			pushed := parseSummary(t, res)
			if !strings.HasPrefix(pushed.Published, "sha256:") {
				t.Fatalf("kiln push did not say what it published: %s", res.stdout)
			}

			fetch := func(ref, name string, more ...string) *summary {
				t.Helper()
				out := filepath.Join(dir, name+".ext4")
				res := kiln(t, run{args: convertArgs(ref, out, filepath.Join(dir, "cache-"+name), append([]string{"--use-published"}, more...)...), env: env})
				if res.err != nil {
					t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
				}
				if got := fileSHA(t, out); got != want && len(more) == 0 && ref == reg.host+"/app:v1" {
					t.Errorf("%s: the rootfs differs from a local build (%s, want %s)", name, got, want)
				}
				fsck(t, out)
				s := parseSummary(t, res)
				t.Logf("%s: fetched %v, timings %v", name, s.Fetched, s.Timings)
				return s
			}
			if s := fetch(ref, "b"); !s.Fetched {
				t.Errorf("kiln convert built the image instead of using the published rootfs")
			}
			// A verity image: its root hash is published and checked.
			localVerity := filepath.Join(dir, "local-verity.ext4")
			if res := kiln(t, run{args: convertArgs(ref, localVerity, filepath.Join(dir, "cache-local"), "--verity", "--use-published=false"), env: env}); res.err != nil {
				t.Fatalf("kiln convert --verity: %v\n%s", res.err, res.stderr)
			}
			if res := kiln(t, run{args: []string{"push", ref, "--verity", "--cache-dir", filepath.Join(dir, "cache-a")}, env: env}); res.err != nil {
				t.Fatalf("kiln push --verity: %v\n%s", res.err, res.stderr)
			}
			if s := fetch(ref, "verity", "--verity"); !s.Fetched {
				t.Errorf("kiln convert --verity built the image instead of using the published rootfs")
			} else if fileSHA(t, filepath.Join(dir, "verity.ext4")) != fileSHA(t, localVerity) {
				t.Errorf("the published verity rootfs differs from a local build")
			}
			// Other options, another build: it is not used.
			if s := fetch(ref, "sized", "--size", "64M"); s.Fetched {
				t.Errorf("a rootfs published for another size was used")
			}

			// Tampered artifacts, each alone beside a fresh copy of the image,
			// and what kiln must say about each (nothing for another build's
			// key: the referrers list rules it out without a download).
			reasons := map[string][]string{
				"image digest": {"the image's digest is"},
				"build key":    nil,
				"chain ID":     {share.AnnotationChainID + " is"},
				"flipped byte": {"verifying", "digest", "zstd", "decompress", "magic", "block"},
				"huge image":   {"more than this build may make"},
			}
			tampers := map[string]func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte{
				"huge image": func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte {
					m.Annotations[share.AnnotationImageSize] = "1125899906842624" // 1 PiB
					return nil
				},
				"image digest": func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte {
					m.Annotations[share.AnnotationImageDigest] = "sha256:" + strings.Repeat("0", 64)
					return nil
				},
				"build key": func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte {
					m.Annotations[share.AnnotationKey] = strings.Repeat("1", 64)
					return nil
				},
				"chain ID": func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte {
					m.Annotations[share.AnnotationChainID] = "sha256:" + strings.Repeat("2", 64)
					return nil
				},
				"flipped byte": func(t *testing.T, ref string, m *ocispec.Manifest, blob []byte) []byte {
					if reg.serveBlob == nil {
						// Rewrite the blob and keep the manifest's digest.
						return flipped(blob)
					}
					reg.serveBlob(m.Layers[0].Digest.String(), flipped(blob))
					return nil
				},
			}
			i := 0
			for what, tamper := range tampers {
				i++
				ref := push(fmt.Sprintf("tampered%d", i))
				res := kiln(t, run{args: []string{"push", ref, "--cache-dir", filepath.Join(dir, "cache-a")}, env: env})
				if res.err != nil {
					t.Fatalf("kiln push: %v\n%s", res.err, res.stderr)
				}
				replaceArtifact(t, ref, auth, func(m *ocispec.Manifest, blob []byte) []byte { return tamper(t, ref, m, blob) })
				out := filepath.Join(dir, fmt.Sprintf("tampered%d.ext4", i))
				res = kiln(t, run{args: convertArgs(ref, out, filepath.Join(dir, fmt.Sprintf("cache-tampered%d", i)), "--use-published", "--log-level", "warn"), env: env})
				if res.err != nil {
					t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
				}
				fsck(t, out)
				if s := parseSummary(t, res); s.Fetched {
					t.Errorf("%s: a tampered rootfs was used", what)
				}
				if want := reasons[what]; want != nil && (!strings.Contains(res.stderr, "not using a published rootfs") || !containsAny(res.stderr, want)) {
					t.Errorf("%s: kiln did not say why it built the image (one of %q):\n%s", what, want, res.stderr)
				}
				t.Logf("%s: %s", what, strings.TrimSpace(res.stderr))
			}

			// A verity image changed and digested again: the blob and the
			// image digest agree with it, its dm-verity tree does not.
			vref := push("tampered-verity")
			if res := kiln(t, run{args: []string{"push", vref, "--verity", "--cache-dir", filepath.Join(dir, "cache-a")}, env: env}); res.err != nil {
				t.Fatalf("kiln push --verity: %v\n%s", res.err, res.stderr)
			}
			replaceArtifact(t, vref, auth, func(m *ocispec.Manifest, blob []byte) []byte {
				image := zstdDecode(t, blob)
				image[5*4096+7] ^= 1 // a data block, under the tree
				m.Annotations[share.AnnotationImageDigest] = digest.FromBytes(image).String()
				return zstdEncode(t, image)
			})
			out := filepath.Join(dir, "tampered-verity.ext4")
			res = kiln(t, run{args: convertArgs(vref, out, filepath.Join(dir, "cache-tampered-verity"), "--verity", "--use-published", "--log-level", "warn"), env: env})
			if res.err != nil {
				t.Fatalf("kiln convert --verity: %v\n%s", res.err, res.stderr)
			}
			if s := parseSummary(t, res); s.Fetched {
				t.Errorf("a verity rootfs whose data its tree does not cover was used")
			} else if !strings.Contains(res.stderr, "dm-verity") {
				t.Errorf("kiln did not say the dm-verity check failed:\n%s", res.stderr)
			}
		})
	}
}

func flipped(b []byte) []byte {
	c := append([]byte(nil), b...)
	c[len(c)/2] ^= 0x40
	return c
}

// replaceArtifact swaps the one artifact published beside ref for a
// tampered one: change edits its manifest and may return other bytes for
// its blob, which are then uploaded under the same digest claim.
func replaceArtifact(t *testing.T, ref string, auth remote.Option, change func(m *ocispec.Manifest, blob []byte) []byte) {
	t.Helper()
	repo, im := referrersOf(t, ref, auth)
	if len(im.Manifests) != 1 {
		t.Fatalf("referrers of %s: %+v, want one", ref, im)
	}
	old := repo.Digest(im.Manifests[0].Digest.String())
	got, err := remote.Get(old, auth)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(got.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	l, err := remote.Layer(repo.Digest(m.Layers[0].Digest.String()), auth)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	var blob bytes.Buffer
	if _, err := blob.ReadFrom(rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if other := change(&m, blob.Bytes()); other != nil {
		// A registry that stores what it is given under any digest is
		// not at hand: put the bytes up as their own blob and claim the
		// old digest for them in a manifest of their own.
		if err := remote.WriteLayer(repo, staticBlob(other), auth); err != nil {
			t.Fatal(err)
		}
		m.Layers[0].Digest, m.Layers[0].Size = staticDigest(other), int64(len(other))
		// The claim is the annotated image digest: the content no longer
		// decompresses to it.
	}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if staticDigest(raw).String() == old.DigestStr() {
		return // only the blob the registry serves changed
	}
	if err := remote.Put(repo.Digest(staticDigest(raw).String()), rawTaggable(raw), auth); err != nil {
		t.Fatal(err)
	}
	if err := remote.Delete(old, auth); err != nil {
		t.Logf("deleting the genuine artifact: %v (it is then listed but missing)", err)
	}
}

// referrersOf lists what refers to the manifest ref names.
func referrersOf(t *testing.T, ref string, auth remote.Option) (name.Repository, *v1.IndexManifest) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(r, auth)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := remote.Referrers(r.Context().Digest(desc.Digest.String()), auth)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatalf("referrers of %s: %v", ref, err)
	}
	return r.Context(), im
}

type rawTaggable []byte

func (r rawTaggable) RawManifest() ([]byte, error)        { return r, nil }
func (r rawTaggable) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

func ggcrRegistry(t *testing.T, referrers bool) shareRegistry {
	r, err := testregistry.StartWith(testregistry.Options{User: shareUser, Password: sharePassword, Referrers: referrers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return shareRegistry{host: r.Host, serveBlob: r.ServeBlob}
}

// distributionRegistry runs Debian's docker-registry (distribution 2.8,
// no referrers API) with htpasswd authentication and deletes enabled.
func distributionRegistry(t testing.TB) shareRegistry {
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		t.Skip("docker-registry is not installed (make deps-test installs it)")
	}
	dir := t.TempDir()
	// The least cost: the registry checks the hash on every request, and
	// at the default cost that takes tens of milliseconds each, which a
	// reader making many range requests would pay many times over.
	hash, err := bcrypt.GenerateFromPassword([]byte(sharePassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "htpasswd"), []byte(shareUser+":"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
auth:
  htpasswd:
    realm: kiln
    path: %s
`, filepath.Join(dir, "data"), addr, filepath.Join(dir, "htpasswd"))
	if err := os.WriteFile(filepath.Join(dir, "config.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", filepath.Join(dir, "config.yml"))
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() //nolint:errcheck // it may have exited
		cmd.Wait()         //nolint:errcheck // killed
	})
	for deadline := time.Now().Add(20 * time.Second); ; {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not start:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return shareRegistry{host: addr}
}

func shareDockerConfig(t testing.TB, host string) string {
	d := t.TempDir()
	cfg, _ := json.Marshal(map[string]any{"auths": map[string]any{
		host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(shareUser + ":" + sharePassword))},
	}})
	if err := os.WriteFile(filepath.Join(d, "config.json"), cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

// shareWrite pushes img as ref with the share registries' credentials.
func shareWrite(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, remote.WithAuth(&authn.Basic{Username: shareUser, Password: sharePassword})); err != nil {
		t.Fatal(err)
	}
}

func staticBlob(b []byte) v1.Layer { return static.NewLayer(b, share.BlobMediaType) }

func staticDigest(b []byte) digest.Digest { return digest.FromBytes(b) }

func zstdDecode(t *testing.T, b []byte) []byte {
	t.Helper()
	d, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	out, err := d.DecodeAll(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func zstdEncode(t *testing.T, b []byte) []byte {
	t.Helper()
	e, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	return e.EncodeAll(b, nil)
}

// TestServeSharedRootfs: kiln serve with [share] push publishes the disk
// it builds for an image pulled through containerd; another node's kiln
// serve with [share] pull uses it instead of building, and exports the
// bytes kiln convert builds; a node whose build options differ builds
// its own. containerd says which image each layer is for through the
// snapshot labels the drop-in turns on; kiln reaches the registry with
// the docker config of its own environment.
func TestServeSharedRootfs(t *testing.T) {
	reg := ggcrRegistry(t, true)
	env := []string{"DOCKER_CONFIG=" + shareDockerConfig(t, reg.host)}
	img := mustBuild(t, testimage.Image{Layers: []testimage.Layer{
		{Tar: layerTar(t, tDir("etc", 0o755, t1), tFile("etc/hostname", 0o644, t1, "node\n"), tFile("big", 0o644, t1, strings.Repeat("kiln", 200000)))},
		{Tar: layerTar(t, tFile("etc/motd", 0o644, t2, "served once\n"))},
	}})
	ref := reg.host + "/served:v1"
	shareWrite(t, ref, img)
	dir := t.TempDir()
	local := filepath.Join(dir, "local.ext4")
	if res := kiln(t, run{args: convertArgs(ref, local, filepath.Join(dir, "cache"), "--use-published=false"), env: map[string]string{"DOCKER_CONFIG": strings.TrimPrefix(env[0], "DOCKER_CONFIG=")}}); res.err != nil {
		t.Fatalf("kiln convert: %v\n%s", res.err, res.stderr)
	}
	want := fileSHA(t, local)

	node := func(config string) *testcontainerd.Env {
		return startContainerd(t, testcontainerd.Options{Metrics: true, Config: config, KilnEnv: env})
	}
	pull := func(e *testcontainerd.Env) {
		ctr(t, e, "-n", "fleet", "image", "pull", "--snapshotter", "kiln", "--user", shareUser+":"+sharePassword, ref)
	}
	shared := func(e *testcontainerd.Env, result string) string {
		for _, l := range strings.Split(ctdMetrics(t, e), "\n") {
			if v, ok := strings.CutPrefix(l, `kiln_shared_rootfs_total{result="`+result+`"} `); ok {
				return v
			}
		}
		return "missing"
	}
	wantShared := func(e *testcontainerd.Env, what string, counts map[string]string) {
		t.Helper()
		ctdEventually(t, what, func() []string {
			var bad []string
			for r, n := range counts {
				if got := shared(e, r); got != n {
					bad = append(bad, fmt.Sprintf("kiln_shared_rootfs_total{result=%q} is %s, want %s", r, got, n))
				}
			}
			return bad
		})
	}

	// Node a builds the disk (eagerly, at the pull) and publishes it.
	a := node("[share]\npush = true\n")
	pull(a)
	wantShared(a, "node a publishes its disk", map[string]string{"published": "1", "publish_failed": "0", "fetched": "0"})

	// Node b fetches it: the same bytes as a local build.
	b := node("[share]\npull = true\n")
	pull(b)
	out := filepath.Join(dir, "b.ext4")
	ctdExport(t, b, "fleet", ref, out)
	if got := fileSHA(t, out); got != want {
		t.Errorf("node b's disk is %s, kiln convert builds %s", got, want)
	}
	wantShared(b, "node b uses the published disk", map[string]string{"fetched": "1", "built": "0", "published": "0"})
	if !strings.Contains(b.KilnLogs(), "using the published rootfs") {
		t.Errorf("node b's kiln did not log that it used the published rootfs")
	}

	// Node c builds with another size: the published disk is not its
	// build, and it builds its own.
	c := node("[build]\nsize = \"64M\"\n\n[share]\npull = true\n")
	pull(c)
	ctdExport(t, c, "fleet", ref, filepath.Join(dir, "c.ext4"))
	wantShared(c, "node c builds its own disk", map[string]string{"fetched": "0", "built": "1"})
	fsck(t, filepath.Join(dir, "c.ext4"))
}
