package chunked

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/kilnfs/kiln/internal/chunk"
)

// PackFile is a pack Cut wrote.
type PackFile struct {
	Pack
	Path string
}

// Cut cuts the image in f into chunks of chunkSize bytes and writes the
// packs, of about packSize bytes each, into dir. The same image and
// sizes give the same index and packs.
func Cut(ctx context.Context, f *os.File, dir string, chunkSize, packSize int64) (*Index, []PackFile, error) {
	if err := checkChunkSize(chunkSize); err != nil {
		return nil, nil, err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(int(max(chunkSize, zstd.MinWindowSize))))
	if err != nil {
		return nil, nil, err
	}
	defer enc.Close()
	c := &cutter{dir: dir, packSize: packSize, enc: enc, seen: map[digest.Digest]Chunk{}}
	defer c.closePack()
	x := &Index{Version: indexVersion, ChunkSize: chunkSize}
	whole := sha256.New()
	buf := make([]byte, chunkSize)
	zero := make([]byte, chunkSize)
	var frame []byte
	for {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		n, rerr := chunk.Fill(f, buf)
		if n > 0 {
			b := buf[:n]
			whole.Write(b)
			x.Size += int64(n)
			if bytes.Equal(b, zero[:n]) {
				x.Chunks = append(x.Chunks, Chunk{})
			} else {
				d := digest.FromBytes(b)
				ch, ok := c.seen[d]
				if !ok {
					frame = enc.EncodeAll(b, frame[:0])
					if ch, err = c.add(d, frame); err != nil {
						return nil, nil, err
					}
					c.seen[d] = ch
				}
				x.Chunks = append(x.Chunks, ch)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return nil, nil, fmt.Errorf("reading %s: %w", f.Name(), rerr)
		}
	}
	if err := c.closePack(); err != nil {
		return nil, nil, err
	}
	if x.Size == 0 {
		return nil, nil, fmt.Errorf("%s is empty", f.Name())
	}
	x.Digest = digest.NewDigest(digest.SHA256, whole)
	for _, p := range c.packs {
		x.Packs = append(x.Packs, p.Pack)
	}
	return x, c.packs, nil
}

// cutter appends frames to packs.
type cutter struct {
	dir      string
	packSize int64
	enc      *zstd.Encoder
	seen     map[digest.Digest]Chunk

	packs []PackFile
	f     *os.File
	h     digest.Digester
	size  int64
}

func (c *cutter) add(d digest.Digest, frame []byte) (Chunk, error) {
	if c.f != nil && c.size+int64(len(frame)) > c.packSize {
		if err := c.closePack(); err != nil {
			return Chunk{}, err
		}
	}
	if c.f == nil {
		f, err := os.Create(filepath.Join(c.dir, fmt.Sprintf("pack-%d", len(c.packs))))
		if err != nil {
			return Chunk{}, err
		}
		c.f, c.h, c.size = f, digest.SHA256.Digester(), 0
	}
	if _, err := c.f.Write(frame); err != nil {
		return Chunk{}, err
	}
	c.h.Hash().Write(frame)
	ch := Chunk{Digest: d, Pack: len(c.packs), Offset: c.size, Length: int64(len(frame))}
	c.size += int64(len(frame))
	return ch, nil
}

// closePack finishes the pack being written, if any.
func (c *cutter) closePack() error {
	if c.f == nil {
		return nil
	}
	f := c.f
	c.f = nil
	if err := f.Close(); err != nil {
		return err
	}
	c.packs = append(c.packs, PackFile{Pack: Pack{Digest: c.h.Digest(), Size: c.size}, Path: f.Name()})
	return nil
}
