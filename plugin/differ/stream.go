package differ

import (
	"context"
	"fmt"
	"io"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/errdefs/pkg/errgrpc"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// BlobStream opens a blob of containerd's content store to be read front
// to back.
type BlobStream func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)

// Streamed reads each blob in one ReadContent stream of containerd's
// content API. A ReaderAt through the API's proxy opens a stream for
// every read, in which containerd looks the blob up and opens it again:
// thousands for a large layer read a few hundred KiB at a time.
func Streamed(client contentapi.ContentClient) BlobStream {
	return func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
		// The size the store has, as the proxy's ReaderAt goes by (an
		// imported blob's descriptor may say otherwise); a missing blob
		// fails here, plainly.
		info, err := client.Info(ctx, &contentapi.InfoRequest{Digest: desc.Digest.String()})
		if err != nil {
			return nil, errgrpc.ToNative(err)
		}
		ctx, cancel := context.WithCancel(ctx)
		rc, err := client.Read(ctx, &contentapi.ReadContentRequest{Digest: desc.Digest.String()})
		if err != nil {
			cancel()
			return nil, errgrpc.ToNative(err)
		}
		return &blobStream{rc: rc, cancel: cancel, left: info.GetInfo().GetSize()}, nil
	}
}

// blobStream is one blob's ReadContent stream.
type blobStream struct {
	rc     contentapi.Content_ReadClient
	cancel context.CancelFunc
	left   int64  // bytes the store says are still to come
	cur    []byte // what is left of the last message
	err    error
}

func (b *blobStream) Read(p []byte) (int, error) {
	for len(b.cur) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		resp, err := b.rc.Recv()
		switch {
		case err == io.EOF && b.left > 0:
			b.err = fmt.Errorf("reading blob: the content store sent %d bytes fewer than its size: %w", b.left, io.ErrUnexpectedEOF)
		case err == io.EOF:
			b.err = io.EOF
		case err != nil:
			b.err = fmt.Errorf("reading blob: %w", errgrpc.ToNative(err))
		case int64(len(resp.Data)) > b.left:
			b.err = fmt.Errorf("reading blob: the content store sent more than its size")
		default:
			b.cur = resp.Data
			b.left -= int64(len(resp.Data))
		}
	}
	n := copy(p, b.cur)
	b.cur = b.cur[n:]
	return n, nil
}

// Close ends the stream, and with it a Read waiting for a message.
func (b *blobStream) Close() error {
	b.cancel()
	return nil
}
