package share

import (
	"io"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	ggstatic "github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// static is a small blob held in memory.
func static(mediaType string, data []byte) v1.Layer {
	return ggstatic.NewLayer(data, types.MediaType(mediaType))
}

// fileBlob is a blob uploaded from its file: a v1.Layer whose digest is
// known already, so that nothing reads it twice.
type fileBlob struct {
	path      string
	digest    digest.Digest
	size      int64
	mediaType string
}

func (b fileBlob) Digest() (v1.Hash, error)             { return v1.NewHash(b.digest.String()) }
func (b fileBlob) DiffID() (v1.Hash, error)             { return v1.NewHash(b.digest.String()) }
func (b fileBlob) Size() (int64, error)                 { return b.size, nil }
func (b fileBlob) MediaType() (types.MediaType, error)  { return types.MediaType(b.mediaType), nil }
func (b fileBlob) Compressed() (io.ReadCloser, error)   { return os.Open(b.path) }
func (b fileBlob) Uncompressed() (io.ReadCloser, error) { return os.Open(b.path) }

func (b fileBlob) descriptor() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: b.mediaType, Digest: b.digest, Size: b.size}
}
