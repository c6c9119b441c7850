package fstree

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Limits caps what an image's layers may make kiln do: they come from
// untrusted images and are read, as root, on every node that pulls them.
// A zero field is no limit.
type Limits struct {
	// LayerBytes caps the bytes of one layer's uncompressed tar, and
	// ImageBytes those of all of an image's layers: a few kilobytes of
	// zstd can otherwise decompress into terabytes.
	LayerBytes int64
	ImageBytes int64
	// Entries caps the entries of all of an image's layers, which cost
	// memory in the tree and inodes in the image.
	Entries int64
	// PathDepth caps the components of an entry's name.
	PathDepth int
	// FileSize caps a regular file's logical size. A sparse entry
	// declares its size without holding its holes, and each byte of it
	// is read (as a zero) before it is known to be a hole.
	FileSize int64
	// XattrBytes caps an entry's extended attributes, names and values.
	XattrBytes int64
}

// MaxFileSize is the largest file ext4 holds with 4 KiB blocks and
// extents: 2^32 blocks less one.
const MaxFileSize = (1<<32 - 1) * blockSize

// DefaultLimits are generous for any real image and keep a hostile one
// from filling a node's disk or memory.
func DefaultLimits() Limits {
	return Limits{
		LayerBytes: 64 << 30,
		ImageBytes: 128 << 30,
		Entries:    4_000_000,
		PathDepth:  256,
		FileSize:   64 << 30,
		XattrBytes: 64 << 10,
	}
}

// LimitError reports an image past one of its limits. Name is the
// limit's name in kiln serve's [limits] configuration.
type LimitError struct {
	Name  string
	Limit int64
}

func (e *LimitError) Error() string {
	limit := strconv.FormatInt(e.Limit, 10)
	if e.Name != "entries" && e.Name != "path_depth" {
		limit += " bytes"
		if v, unit := iec(e.Limit); unit != "" {
			limit = strconv.FormatInt(v, 10) + " " + unit
		}
	}
	return fmt.Sprintf("over the %s limit of %s", e.Name, limit)
}

// iec writes n in the largest binary unit that divides it, if any.
func iec(n int64) (int64, string) {
	unit := ""
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB"} {
		if n == 0 || n%1024 != 0 {
			break
		}
		n, unit = n/1024, u
	}
	return n, unit
}

// over returns a LimitError if n is past a limit (0 is none).
func over(name string, n, limit int64) error {
	if limit > 0 && n > limit {
		return &LimitError{Name: name, Limit: limit}
	}
	return nil
}

// checkHeader applies the limits that an entry's header decides alone.
// A file's size is never past what ext4 holds, whatever the limit.
func (l Limits) checkHeader(hdr *tar.Header, depth int) error {
	if err := over("path_depth", int64(depth), int64(l.PathDepth)); err != nil {
		return err
	}
	if hdr.Size > MaxFileSize {
		return fmt.Errorf("a file of %d bytes: ext4 holds at most %d", hdr.Size, int64(MaxFileSize))
	}
	if err := over("file_size", hdr.Size, l.FileSize); err != nil {
		return err
	}
	var xattrs int64
	for k, v := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") || strings.HasPrefix(k, "LIBARCHIVE.xattr.") {
			xattrs += int64(len(k) + len(v))
		}
	}
	return over("xattr_bytes", xattrs, l.XattrBytes)
}

// meter counts the bytes of a layer's uncompressed tar as they are read
// and fails the read that passes a limit. It also checks for
// cancellation, so that no single entry, however long, outlives its
// context.
type meter struct {
	ctx      context.Context
	r        io.Reader
	layer    int64  // bytes read from this layer
	image    *int64 // bytes read from all the image's layers, or nil
	limits   Limits
	sinceCtx int64
}

const ctxCheckBytes = 1 << 20

func (m *meter) Read(p []byte) (int, error) {
	n, err := m.r.Read(p)
	m.layer += int64(n)
	if lerr := over("layer_bytes", m.layer, m.limits.LayerBytes); lerr != nil {
		return n, lerr
	}
	if m.image != nil {
		*m.image += int64(n)
		if lerr := over("image_bytes", *m.image, m.limits.ImageBytes); lerr != nil {
			return n, lerr
		}
	}
	if m.sinceCtx += int64(n); m.sinceCtx >= ctxCheckBytes {
		m.sinceCtx = 0
		if cerr := m.ctx.Err(); cerr != nil {
			return n, cerr
		}
	}
	return n, err
}
