package differ

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
)

// fakeContent answers Info and Read of one blob the way containerd's
// content service does: Read sends the stored bytes in messages of at
// most msg bytes.
type fakeContent struct {
	contentapi.ContentClient
	data  []byte // what Read sends
	size  int64  // what Info says
	msg   int
	reads int
}

func (f *fakeContent) Info(ctx context.Context, req *contentapi.InfoRequest, _ ...grpc.CallOption) (*contentapi.InfoResponse, error) {
	if f.data == nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
	}
	return &contentapi.InfoResponse{Info: &contentapi.Info{Digest: req.Digest, Size: f.size}}, nil
}

func (f *fakeContent) Read(ctx context.Context, req *contentapi.ReadContentRequest, _ ...grpc.CallOption) (contentapi.Content_ReadClient, error) {
	f.reads++
	return &fakeStream{ctx: ctx, f: f, left: f.data}, nil
}

type fakeStream struct {
	grpc.ClientStream
	ctx  context.Context
	f    *fakeContent
	left []byte
}

func (s *fakeStream) Recv() (*contentapi.ReadContentResponse, error) {
	if err := s.ctx.Err(); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if len(s.left) == 0 {
		return nil, io.EOF
	}
	n := min(len(s.left), s.f.msg)
	resp := &contentapi.ReadContentResponse{Data: s.left[:n]}
	s.left = s.left[n:]
	return resp, nil
}

func TestStreamed(t *testing.T) {
	blob := bytes.Repeat([]byte("kiln layer "), 100000)
	desc := ocispec.Descriptor{Digest: digest.FromBytes(blob), Size: 7} // a descriptor's size is not what counts
	ctx := context.Background()
	read := func(f *fakeContent) ([]byte, error) {
		rc, err := Streamed(f)(ctx, desc)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		return io.ReadAll(rc)
	}

	t.Run("whole", func(t *testing.T) {
		f := &fakeContent{data: blob, size: int64(len(blob)), msg: 1 << 20 / 3}
		got, err := read(f)
		if err != nil || !bytes.Equal(got, blob) || f.reads != 1 {
			t.Fatalf("read %d bytes in %d streams, %v; want the %d bytes in one", len(got), f.reads, err, len(blob))
		}
	})
	t.Run("empty", func(t *testing.T) {
		got, err := read(&fakeContent{data: []byte{}, msg: 1})
		if err != nil || len(got) != 0 {
			t.Fatalf("read %q, %v", got, err)
		}
	})
	t.Run("short", func(t *testing.T) {
		_, err := read(&fakeContent{data: blob[:1000], size: int64(len(blob)), msg: 100})
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("a stream that ends early: %v, want an unexpected EOF", err)
		}
	})
	t.Run("long", func(t *testing.T) {
		_, err := read(&fakeContent{data: blob, size: 1000, msg: 100})
		if err == nil || !strings.Contains(err.Error(), "more than its size") {
			t.Fatalf("a stream longer than the blob: %v", err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		_, err := Streamed(&fakeContent{})(ctx, desc)
		if !errdefs.IsNotFound(err) {
			t.Fatalf("a missing blob: %v, want not found", err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		rc, err := Streamed(&fakeContent{data: blob, size: int64(len(blob)), msg: 10})(ctx, desc)
		if err != nil {
			t.Fatal(err)
		}
		rc.Close()
		rc.Close()
		if _, err := io.ReadAll(rc); !errdefs.IsCanceled(err) {
			t.Fatalf("a read after Close: %v, want cancelled", err)
		}
	})
}
