package share

import (
	"io"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	ggstatic "github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// static is a small blob held in memory.
func static(mediaType string, data []byte) v1.Layer {
	return ggstatic.NewLayer(data, types.MediaType(mediaType))
}

// The compressed rootfs is uploaded as a blob from its file: a v1.Layer
// whose digests are known already, so that nothing reads it twice.

func (c *compressed) Digest() (v1.Hash, error)             { return v1.NewHash(c.digest.String()) }
func (c *compressed) DiffID() (v1.Hash, error)             { return v1.NewHash(c.digest.String()) }
func (c *compressed) Size() (int64, error)                 { return c.size, nil }
func (c *compressed) MediaType() (types.MediaType, error)  { return BlobMediaType, nil }
func (c *compressed) Compressed() (io.ReadCloser, error)   { return os.Open(c.path) }
func (c *compressed) Uncompressed() (io.ReadCloser, error) { return os.Open(c.path) }
