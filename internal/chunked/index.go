// Package chunked cuts a finished rootfs image into content-addressed
// chunks for the registry, and reads such an image back a chunk at a
// time, so that a VM can boot it before the whole image has arrived.
//
// The image is cut into chunks of ChunkSize bytes (512 KiB by default).
// A chunk of zeros is a hole and costs nothing; every other chunk is
// named by the SHA-256 of its bytes, compressed on its own (one zstd
// frame) and stored once per image, however often it recurs, in packs:
// blobs of concatenated frames, read back with HTTP range requests, so
// an image of any size stays within what registries take for a blob and
// a manifest. The index (a JSON blob) maps every chunk of the image to
// its digest and to where its frame lies. kiln lays out an image's file
// contents layer by layer from its start, so two images on the same base
// share the chunks of the base's contents: a chunk cached for one is not
// fetched for the other.
package chunked

import (
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Media types of a chunked rootfs artifact.
const (
	ArtifactType   = "application/vnd.kiln.rootfs.chunked.v1"
	IndexMediaType = "application/vnd.kiln.rootfs.chunk-index.v1+json"
	PackMediaType  = "application/vnd.kiln.rootfs.chunk-pack.v1+zstd"
)

// Defaults for Cut.
const (
	DefaultChunkSize = 512 << 10
	DefaultPackSize  = 64 << 20
)

// Bounds an index must keep: chunks of whole 4 KiB blocks from
// MinChunkSize to MaxChunkSize (small enough to fetch and check one at a
// time, large enough that an index stays small), and at most MaxChunks
// of them.
const (
	blockSize    = 4 << 10
	MinChunkSize = 64 << 10
	MaxChunkSize = 4 << 20
	MaxChunks    = 1 << 20
)

// Index maps each chunk of an image to its digest and its frame.
type Index struct {
	Version   int           `json:"version"`
	Size      int64         `json:"size"`       // the image's bytes
	ChunkSize int64         `json:"chunk_size"` // every chunk's, but the last one's
	Digest    digest.Digest `json:"digest"`     // the whole image's SHA-256
	// Packs are the pack blobs, as the artifact lists them after the
	// index.
	Packs []Pack `json:"packs"`
	// Chunks has one entry per chunk of the image, in order.
	Chunks []Chunk `json:"chunks"`
}

// Pack is one blob of frames.
type Pack struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

// Chunk is where a chunk's frame lies: Length bytes at Offset in pack
// Pack. A hole (a chunk of zeros) has no digest and no frame.
type Chunk struct {
	Digest digest.Digest `json:"d,omitempty"`
	Pack   int           `json:"p,omitempty"`
	Offset int64         `json:"o,omitempty"`
	Length int64         `json:"l,omitempty"`
}

// Hole says whether the chunk is all zeros.
func (c Chunk) Hole() bool { return c.Digest == "" }

const indexVersion = 1

// Len is the length of chunk i.
func (x *Index) Len(i int) int64 {
	return min(x.ChunkSize, x.Size-int64(i)*x.ChunkSize)
}

// Validate checks that the index describes an image it can be read by:
// an index comes from the registry and is not trusted.
func (x *Index) Validate() error {
	if x.Version != indexVersion {
		return fmt.Errorf("chunk index version %d, kiln reads %d", x.Version, indexVersion)
	}
	if err := checkChunkSize(x.ChunkSize); err != nil {
		return err
	}
	if x.Size <= 0 || (x.Size+x.ChunkSize-1)/x.ChunkSize > MaxChunks {
		return fmt.Errorf("image size %d: more than %d chunks of %d", x.Size, MaxChunks, x.ChunkSize)
	}
	if err := x.Digest.Validate(); err != nil || x.Digest.Algorithm() != digest.SHA256 {
		return fmt.Errorf("image digest %q", x.Digest)
	}
	if want := (x.Size + x.ChunkSize - 1) / x.ChunkSize; int64(len(x.Chunks)) != want {
		return fmt.Errorf("%d chunks for an image of %d bytes in chunks of %d (want %d)", len(x.Chunks), x.Size, x.ChunkSize, want)
	}
	for i, p := range x.Packs {
		if err := p.Digest.Validate(); err != nil || p.Size <= 0 {
			return fmt.Errorf("pack %d: digest %q, size %d", i, p.Digest, p.Size)
		}
	}
	// A frame may be a little longer than its chunk, never much.
	maxFrame := x.ChunkSize + x.ChunkSize/64 + 1024
	for i, c := range x.Chunks {
		if c.Hole() {
			if c.Pack != 0 || c.Offset != 0 || c.Length != 0 {
				return fmt.Errorf("chunk %d: a hole with a frame", i)
			}
			continue
		}
		if err := c.Digest.Validate(); err != nil || c.Digest.Algorithm() != digest.SHA256 {
			return fmt.Errorf("chunk %d: digest %q", i, c.Digest)
		}
		if c.Pack < 0 || c.Pack >= len(x.Packs) {
			return fmt.Errorf("chunk %d: pack %d of %d", i, c.Pack, len(x.Packs))
		}
		if c.Length <= 0 || c.Length > maxFrame || c.Offset < 0 || c.Offset > x.Packs[c.Pack].Size-c.Length {
			return fmt.Errorf("chunk %d: frame of %d bytes at %d in a pack of %d", i, c.Length, c.Offset, x.Packs[c.Pack].Size)
		}
	}
	// Only the last chunk may be short: its digest cannot be a whole
	// chunk's too.
	if last := len(x.Chunks) - 1; x.Len(last) != x.ChunkSize && !x.Chunks[last].Hole() {
		for i, c := range x.Chunks[:last] {
			if c.Digest == x.Chunks[last].Digest {
				return fmt.Errorf("chunks %d and %d: one digest for %d and %d bytes", i, last, x.ChunkSize, x.Len(last))
			}
		}
	}
	return nil
}

func checkChunkSize(n int64) error {
	if n < MinChunkSize || n > MaxChunkSize || n%blockSize != 0 {
		return fmt.Errorf("chunk size %d: want a multiple of %d from %d to %d", n, blockSize, MinChunkSize, MaxChunkSize)
	}
	return nil
}

// MaxIndexSize bounds the encoded index of an image of size bytes in
// chunks of chunkSize: what kiln writes, about 130 bytes a chunk, with
// room to spare. A larger index is refused before it is read.
func MaxIndexSize(size, chunkSize int64) int64 {
	if chunkSize <= 0 || size <= 0 {
		return 0
	}
	return (size+chunkSize-1)/chunkSize*256 + 64<<10
}
