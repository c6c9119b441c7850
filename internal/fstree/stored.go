package fstree

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"time"

	"github.com/kilnfs/kiln/internal/chunk"
	"github.com/kilnfs/kiln/internal/seqwrite"
)

// A stored layer is a layer kept for later builds in two files instead
// of its tar: its data file holds the contents of its regular files,
// each at its place in the data space of the layers below and this one
// (see Run.Virtual), and its record holds every entry's header and where
// its content went. Nothing in it depends on the tree: StoreLayer needs
// only where the data space of the layers below ends. A writer can make
// the data file of an image's top layer the image itself (see
// ext4.Options.Take), so that a pulled layer's contents are written once.

// placer reads a regular file's content and places its blocks that are
// not all zero in the data space: written at their place through w, or,
// with w nil, left where they are in a stored tar (from base on).
type placer struct {
	ctx   context.Context
	space *dataSpace
	meter *meter
	buf   []byte
	file  int // the data file the runs name
	w     *seqwrite.Writer
	runs  []Run // reused from file to file
}

func (p *placer) place(r io.Reader, base int64) (size int64, runs []Run, err error) {
	runs = p.runs[:0]
	var zero [blockSize]byte
	for {
		if err := p.ctx.Err(); err != nil {
			return 0, nil, err
		}
		before := p.meter.layer
		n, rerr := chunk.Fill(r, p.buf)
		// Nothing read from the layer: the whole chunk is a hole of a
		// sparse entry, zeros that need no looking at.
		hole := p.meter.layer == before
		data := p.buf[:n]
		runStart := -1
		flush := func(end int) error {
			if runStart < 0 {
				return nil
			}
			from := runStart
			runStart = -1
			return p.space.take(int64(end-from), func(virtual, length int64) error {
				off := size + int64(from)
				at := base + off
				if p.w != nil {
					at = virtual
					if err := p.w.WriteAt(data[from:from+int(length)], at); err != nil {
						return fmt.Errorf("data file: %w", err)
					}
				}
				if k := len(runs) - 1; k >= 0 && runs[k].Offset+runs[k].Length == off &&
					runs[k].DataOffset+runs[k].Length == at && runs[k].Virtual+runs[k].Length == virtual {
					runs[k].Length += length
				} else {
					runs = append(runs, Run{Offset: off, Length: length, File: p.file, DataOffset: at, Virtual: virtual})
				}
				from += int(length)
				return nil
			})
		}
		for off := 0; off < n && !hole; off += blockSize {
			end := min(off+blockSize, n)
			if bytes.Equal(data[off:end], zero[:end-off]) {
				if err := flush(off); err != nil {
					return 0, nil, err
				}
				continue
			}
			if runStart < 0 {
				runStart = off
			}
		}
		if err := flush(n); err != nil {
			return 0, nil, err
		}
		size += int64(n)
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return 0, nil, fmt.Errorf("reading content: %w", rerr)
		}
	}
	p.runs = runs
	return size, runs, nil
}

// StoredLayer describes a layer StoreLayer kept.
type StoredLayer struct {
	Start, End int64 // the data space it took, from its first byte on
	Bytes      int64 // the size of its tar
	Entries    int64
}

// StoreLayer reads an uncompressed layer tar, checks every entry as Check
// does, writes the contents of its regular files into data at their
// places in the data space, from start on (where the layers below it
// end), and the record of its entries to record. Parts of data the layer
// does not fill stay holes. layer names the layer in errors.
func StoreLayer(ctx context.Context, r io.Reader, layer string, limits Limits, start int64, data *os.File, record io.Writer) (StoredLayer, error) {
	if start%blockSize != 0 || start < 0 {
		return StoredLayer{}, fmt.Errorf("layer %s: data space starts at %d, not on a block", layer, start)
	}
	m := &meter{ctx: ctx, r: r, limits: limits}
	dw := seqwrite.New(data, 1<<20)
	dw.WriteBehind(writeBehind)
	p := placer{ctx: ctx, space: &dataSpace{end: start}, meter: m, buf: make([]byte, 1<<20), w: dw}
	rw := &recordWriter{w: bufio.NewWriterSize(record, 256<<10)}
	rw.header(start)
	var entries int64
	err := eachEntry(ctx, m, layer, func(hdr *tar.Header, r io.Reader) error {
		parts, err := checkEntry(hdr, &entries, limits)
		if err != nil {
			return err
		}
		var size int64
		var runs []Run
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont:
			if isWhiteout(parts) {
				break // Apply places no content for it either
			}
			var err error
			if size, runs, err = p.place(r, 0); err != nil {
				return err
			}
		}
		return rw.entry(hdr, size, runs)
	})
	if err != nil {
		return StoredLayer{}, err
	}
	// The tar reader stops at the end marker; the rest (padding) is part
	// of the layer and of its size.
	if _, err := io.Copy(io.Discard, m); err != nil {
		return StoredLayer{}, fmt.Errorf("layer %s: %w", layer, err)
	}
	if err := dw.Flush(); err != nil {
		return StoredLayer{}, fmt.Errorf("layer %s: data file: %w", layer, err)
	}
	st := StoredLayer{Start: start, End: p.space.end, Bytes: m.layer, Entries: entries}
	rw.trailer(st)
	if rw.err == nil {
		rw.err = rw.w.Flush()
	}
	if rw.err != nil {
		return StoredLayer{}, fmt.Errorf("layer %s: record: %w", layer, rw.err)
	}
	return st, nil
}

// The record: a magic line, the start of the layer's data space, one
// entry after another (tag 1), and a trailer (tag 0) with the layer's
// StoredLayer. Numbers are varints; strings are a length and bytes.
const recordMagic = "kiln-stored-layer-1\n"

type recordWriter struct {
	w   *bufio.Writer
	err error
	tmp [binary.MaxVarintLen64]byte
}

func (w *recordWriter) uint(v uint64) {
	if w.err == nil {
		_, w.err = w.w.Write(binary.AppendUvarint(w.tmp[:0], v))
	}
}

func (w *recordWriter) int(v int64) {
	if w.err == nil {
		_, w.err = w.w.Write(binary.AppendVarint(w.tmp[:0], v))
	}
}

func (w *recordWriter) str(s string) {
	w.uint(uint64(len(s)))
	if w.err == nil {
		_, w.err = w.w.WriteString(s)
	}
}

func (w *recordWriter) time(t time.Time) {
	if t.IsZero() {
		w.uint(0)
		return
	}
	w.uint(1)
	w.int(t.Unix())
	w.uint(uint64(t.Nanosecond()))
}

func (w *recordWriter) header(start int64) {
	if w.err == nil {
		_, w.err = w.w.WriteString(recordMagic)
	}
	w.int(start)
}

func (w *recordWriter) entry(hdr *tar.Header, size int64, runs []Run) error {
	w.uint(1)
	w.uint(uint64(hdr.Typeflag))
	w.str(hdr.Name)
	w.str(hdr.Linkname)
	w.int(hdr.Mode)
	w.int(int64(hdr.Uid))
	w.int(int64(hdr.Gid))
	w.int(hdr.Devmajor)
	w.int(hdr.Devminor)
	w.time(hdr.ModTime)
	w.time(hdr.AccessTime)
	w.time(hdr.ChangeTime)
	keys := make([]string, 0, len(hdr.PAXRecords))
	for k := range hdr.PAXRecords {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	w.uint(uint64(len(keys)))
	for _, k := range keys {
		w.str(k)
		w.str(hdr.PAXRecords[k])
	}
	w.int(hdr.Size)
	w.int(size)
	w.uint(uint64(len(runs)))
	for _, r := range runs {
		w.int(r.Offset)
		w.int(r.Length)
		w.int(r.Virtual)
	}
	if w.err != nil {
		return fmt.Errorf("record: %w", w.err)
	}
	return nil
}

// The trailer after its tag: four 8-byte numbers and a closing magic, so
// that ReadStored finds them at the end of the record, and a record cut
// short or zeroed by a crash is not taken for one.
const (
	trailerSize  = 1 + 32 + len(trailerMagic) // bytes
	trailerMagic = "kiln-end"
)

func (w *recordWriter) trailer(st StoredLayer) {
	var b [trailerSize]byte
	for i, v := range []int64{st.Start, st.End, st.Bytes, st.Entries} {
		binary.LittleEndian.PutUint64(b[1+8*i:], uint64(v))
	}
	copy(b[33:], trailerMagic)
	if w.err == nil {
		_, w.err = w.w.Write(b[:])
	}
}

// recordReader reads a record back.
type recordReader struct {
	r   *bufio.Reader
	err error
}

var errBadRecord = errors.New("malformed stored layer record")

func (r *recordReader) uint() uint64 {
	if r.err != nil {
		return 0
	}
	v, err := binary.ReadUvarint(r.r)
	if err != nil {
		r.err = errBadRecord
	}
	return v
}

func (r *recordReader) int() int64 {
	if r.err != nil {
		return 0
	}
	v, err := binary.ReadVarint(r.r)
	if err != nil {
		r.err = errBadRecord
	}
	return v
}

func (r *recordReader) str() string {
	n := r.uint()
	if r.err != nil {
		return ""
	}
	if n > 1<<20 {
		r.err = errBadRecord
		return ""
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r.r, b); err != nil {
		r.err = errBadRecord
	}
	return string(b)
}

func (r *recordReader) time() time.Time {
	switch r.uint() {
	case 0:
		return time.Time{}
	case 1:
	default:
		r.err = errBadRecord
		return time.Time{}
	}
	sec := r.int()
	nsec := r.uint()
	if nsec >= 1e9 {
		r.err = errBadRecord
	}
	return time.Unix(sec, int64(nsec))
}

// replayed is a regular file's content as the record has it.
type replayed struct {
	size int64
	runs []Run
}

// next reads the next entry into hdr and rep; false at the trailer.
func (r *recordReader) next(hdr *tar.Header, rep *replayed, file int, start int64) bool {
	switch r.uint() {
	case 0:
		return false
	case 1:
	default:
		r.err = errBadRecord
		return false
	}
	*hdr = tar.Header{
		Typeflag: byte(r.uint()),
		Name:     r.str(),
		Linkname: r.str(),
		Mode:     r.int(),
		Uid:      int(r.int()),
		Gid:      int(r.int()),
		Devmajor: r.int(),
		Devminor: r.int(),
	}
	hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = r.time(), r.time(), r.time()
	if n := r.uint(); n > 0 && r.err == nil {
		if n > 1<<20 { // archive/tar reads at most 1 MiB of PAX records
			r.err = errBadRecord
			return false
		}
		hdr.PAXRecords = make(map[string]string, n)
		for range n {
			k := r.str()
			hdr.PAXRecords[k] = r.str()
		}
	}
	hdr.Size = r.int()
	rep.size = r.int()
	n := r.uint()
	if rep.size < 0 || n > uint64(rep.size/blockSize+2) {
		r.err = errBadRecord
		return false
	}
	rep.runs = rep.runs[:0]
	for range n {
		run := Run{Offset: r.int(), Length: r.int(), Virtual: r.int(), File: file}
		run.DataOffset = run.Virtual
		if run.Offset < 0 || run.Length <= 0 || run.Length > rep.size || run.Offset > rep.size-run.Length ||
			run.Virtual%blockSize != 0 || run.Virtual < start || run.Virtual > math.MaxInt64-run.Length ||
			len(rep.runs) > 0 && run.Offset < rep.runs[len(rep.runs)-1].Offset+rep.runs[len(rep.runs)-1].Length {
			r.err = errBadRecord
		}
		rep.runs = append(rep.runs, run)
	}
	return r.err == nil
}

// ReadStored returns what the trailer of a stored layer's record says.
func ReadStored(record string) (StoredLayer, error) {
	f, err := os.Open(record)
	if err != nil {
		return StoredLayer{}, err
	}
	defer f.Close()
	b := make([]byte, len(recordMagic)+trailerSize)
	if _, err := f.ReadAt(b[:len(recordMagic)], 0); err != nil || string(b[:len(recordMagic)]) != recordMagic {
		return StoredLayer{}, fmt.Errorf("%s: %w", record, errBadRecord)
	}
	fi, err := f.Stat()
	if err != nil {
		return StoredLayer{}, err
	}
	if fi.Size() < int64(len(b)) {
		return StoredLayer{}, fmt.Errorf("%s: %w", record, errBadRecord)
	}
	if _, err := f.ReadAt(b[:trailerSize], fi.Size()-int64(trailerSize)); err != nil {
		return StoredLayer{}, fmt.Errorf("%s: %w", record, err)
	}
	st, err := decodeTrailer(b[:trailerSize])
	if err != nil {
		return StoredLayer{}, fmt.Errorf("%s: %w", record, err)
	}
	return st, nil
}

// decodeTrailer decodes a trailer, its tag included.
func decodeTrailer(b []byte) (StoredLayer, error) {
	if b[0] != 0 || string(b[33:]) != trailerMagic {
		return StoredLayer{}, errBadRecord
	}
	var v [4]int64
	for i := range v {
		v[i] = int64(binary.LittleEndian.Uint64(b[1+8*i:]))
	}
	st := StoredLayer{Start: v[0], End: v[1], Bytes: v[2], Entries: v[3]}
	if st.Start < 0 || st.End < st.Start || st.End%blockSize != 0 || st.Start%blockSize != 0 || st.Bytes < 0 || st.Entries < 0 {
		return StoredLayer{}, errBadRecord
	}
	return st, nil
}

func (r *recordReader) start() (int64, error) {
	magic := make([]byte, len(recordMagic))
	if _, err := io.ReadFull(r.r, magic); err != nil || string(magic) != recordMagic {
		return 0, errBadRecord
	}
	start := r.int()
	return start, r.err
}

// trailer reads the trailer after next returned false.
func (r *recordReader) trailer() (StoredLayer, error) {
	if r.err != nil {
		return StoredLayer{}, r.err
	}
	var b [trailerSize]byte // the tag, 0, was read
	if _, err := io.ReadFull(r.r, b[1:]); err != nil {
		return StoredLayer{}, errBadRecord
	}
	if _, err := r.r.ReadByte(); err != io.EOF {
		return StoredLayer{}, errBadRecord
	}
	return decodeTrailer(b[:])
}

// ApplyStoredLayer replays a layer that StoreLayer kept, from its record,
// with the contents in its data file, which is the first of paths that
// exists when a writer opens it (a data file may be renamed once made an
// image). The layers below must be the ones it was stored on: the tree's
// data space must end where the layer's starts, or before.
func (t *Tree) ApplyStoredLayer(ctx context.Context, record io.Reader, layer string, paths ...string) error {
	rr := &recordReader{r: bufio.NewReaderSize(record, 256<<10)}
	start, err := rr.start()
	if err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	if start < t.space.end {
		return fmt.Errorf("layer %s: stored for a data space from %d, the layers below end at %d", layer, start, t.space.end)
	}
	t.layers++
	file := len(t.data)
	t.data = append(t.data, dataFile{paths: paths})
	a := &applier{ctx: ctx, t: t, layer: t.layers, name: layer, stored: -1,
		meter: &meter{ctx: ctx, r: eofReader{}, image: &t.imageBytes, limits: t.limits}, replay: &replayed{}}
	var hdr tar.Header
	var end int64
	for rr.next(&hdr, a.replay, file, start) {
		if err := ctx.Err(); err != nil {
			return err
		}
		for _, r := range a.replay.runs {
			end = max(end, r.Virtual+r.Length)
		}
		// The tree's data space covers every run it holds, even if a
		// later entry fails.
		t.space.end = max(t.space.end, (end+blockSize-1)/blockSize*blockSize)
		if err := a.entry(&hdr, nil); err != nil {
			var ee *EntryError
			if errors.As(err, &ee) {
				return err
			}
			return &EntryError{Layer: layer, Entry: hdr.Name, Err: err}
		}
	}
	st, err := rr.trailer()
	if err == nil && st.Start != start {
		err = errBadRecord
	}
	if err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	// Every run must lie in the layer's part of the data space.
	if end > st.End {
		return fmt.Errorf("layer %s: %w", layer, errBadRecord)
	}
	t.imageBytes += st.Bytes
	if err := over("image_bytes", t.imageBytes, t.limits.ImageBytes); err != nil {
		return fmt.Errorf("layer %s: %w", layer, err)
	}
	t.space.end = max(t.space.end, st.End)
	return nil
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
