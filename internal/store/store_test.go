package store

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestAddBlob: a blob named into the content store is one the store
// lists and reads like a committed one.
func TestAddBlob(t *testing.T) {
	s, ctx := openTemp(t)
	data := []byte("a layer blob")
	d := digest.FromBytes(data)
	file := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.AddBlob(d, file); err != nil {
		t.Fatal(err)
	}
	info, err := s.Content().Info(ctx, d)
	if err != nil || info.Size != int64(len(data)) {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	got, err := content.ReadBlob(ctx, s.Content(), ocispec.Descriptor{Digest: d, Size: int64(len(data))})
	if err != nil || string(got) != string(data) {
		t.Fatalf("ReadBlob = %q, %v", got, err)
	}
}

// TestOldIngestsAborted: what an earlier kiln's interrupted fetch left in
// the content store's ingests goes when the cache is opened, unless
// another run holds that blob's lock.
func TestOldIngestsAborted(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ingest := func(data string) digest.Digest {
		d := digest.FromString(data)
		w, err := content.OpenWriter(ctx, s.Content(), content.WithRef("kiln-"+d.String()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(data[:3])); err != nil {
			t.Fatal(err)
		}
		w.Close()
		return d
	}
	ingest("left behind")
	held := ingest("being fetched")
	l, err := s.LockBlob(ctx, held, true)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	sts, err := s.Content().ListStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) != 1 || sts[0].Ref != "kiln-"+held.String() {
		t.Fatalf("ingests left: %+v; want only the held blob's", sts)
	}
}
