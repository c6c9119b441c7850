// Package fstreetest draws layers from fuzz input for the tests of what
// reads them: one to four small tars whose names come from an alphabet
// made for trouble ("..", ".", "", whiteouts, opaque markers), holding
// every entry type an image can (directories, files with holes, symlinks
// with relative and absolute targets, hard links, devices, fifos) with
// random metadata, xattrs and content, and now and then what stretches
// an ext4 writer: big directories, long names and targets, files of many
// extents, times far from now, ACLs. The same input gives the same
// layers.
package fstreetest

import (
	"archive/tar"
	"bytes"
	"fmt"
	"math/rand"
	"strings"
	"time"
)

// Entry is one tar entry and its content.
type Entry struct {
	Header  tar.Header
	Content []byte
}

// Layer is a layer's entries in tar order.
type Layer []Entry

// Tar writes the layer as a PAX tar.
func (l Layer) Tar() []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range l {
		if err := writeEntry(tw, e); err != nil {
			panic(fmt.Sprintf("fstreetest: entry %q: %v", e.Header.Name, err)) // Layers made it
		}
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

func writeEntry(tw *tar.Writer, e Entry) error {
	h := e.Header
	if err := tw.WriteHeader(&h); err != nil {
		return err
	}
	_, err := tw.Write(e.Content)
	return err
}

// Layers draws one to four layers from data.
func Layers(data []byte) []Layer {
	s := &source{data: data}
	layers := make([]Layer, 1+s.intn(4))
	for i := range layers {
		for range s.intn(16) {
			var es []Entry
			if s.byte() >= 248 {
				es = s.bigDir()
			} else {
				es = []Entry{s.entry()}
			}
			for _, e := range es {
				// Keep only what archive/tar writes: the layers are
				// tars any tool could have made.
				if writeEntry(tar.NewWriter(&bytes.Buffer{}), e) != nil {
					continue
				}
				layers[i] = append(layers[i], e)
				if h := e.Header; h.Typeflag != tar.TypeDir && !strings.Contains(h.Name, ".wh.") {
					s.files = append(s.files, h.Name)
				}
			}
		}
	}
	return layers
}

// Seeds are inputs for Layers, fixed pseudo-random bytes of a few
// lengths, that make layers of every kind of entry with content: a
// fuzzer that starts from them need not find its way there first.
func Seeds() [][]byte {
	rng := rand.New(rand.NewSource(1))
	var seeds [][]byte
	for _, n := range []int{0, 50, 200, 400, 800} {
		b := make([]byte, n)
		rng.Read(b)
		seeds = append(seeds, b)
	}
	return seeds
}

// source hands out the fuzz input a byte at a time, then zeros.
type source struct {
	data  []byte
	files []string // names given to what is not a directory, for hard links
}

func (s *source) byte() byte {
	if len(s.data) == 0 {
		return 0
	}
	b := s.data[0]
	s.data = s.data[1:]
	return b
}

func (s *source) intn(n int) int { return int(s.byte()) % n }

func (s *source) pick(from []string) string { return from[s.intn(len(from))] }

// dirs are the components of names and link targets, a few so that
// entries meet; files also name what is not a directory, mostly apart,
// so that a layer goes through a file now and then, not at every turn.
var (
	dirs  = []string{"a", "b", "c"}
	files = []string{"a", "b", "c", "f", "g", "h", "i", strings.Repeat("n", 255)}
)

// odd are components that mean something to Apply: whiteouts, aufs
// metadata, and (in link targets) "." and "".
var odd = []string{".wh.a", ".wh.b", ".wh..wh..opq", ".wh..wh.plnk", ".", ""}

type pathKind int

const (
	dirPath    pathKind = iota // a directory's name
	filePath                   // the name of what is not a directory
	targetPath                 // a symlink's target
)

// path is one to three components, the root itself or an absolute path
// now and then (a layer fails at such an entry). Symlink targets are
// often absolute and climb with "..", and some are long.
func (s *source) path(kind pathKind) string {
	parts := make([]string, 1+s.intn(3))
	for i := range parts {
		parts[i] = s.component(kind, kind == filePath && i == len(parts)-1)
	}
	p := strings.Join(parts, "/")
	switch b := s.byte(); {
	case b == 0 && kind != targetPath:
		return "./"
	case b == 1, kind == targetPath && b >= 160:
		p = "/" + p
	case b < 48:
		p = "./" + p
	case b < 64 && kind == dirPath:
		p += "/" // archive/tar refuses it for the rest
	case b < 80:
		p = strings.Replace(p, "/", "/./", 1)
	case b < 96:
		p = strings.Replace(p, "/", "//", 1)
	case b < 100 && kind == targetPath:
		p = strings.Repeat("./", 30*s.intn(68)) + p // up to 4 KiB
	}
	return p
}

func (s *source) component(kind pathKind, last bool) string {
	switch b := s.byte(); {
	case b < 200 && last:
		return files[int(b)%len(files)]
	case b < 200:
		return dirs[int(b)%len(dirs)]
	case b == 255, kind == targetPath && b >= 232:
		return ".."
	case kind == targetPath:
		return odd[int(b)%len(odd)]
	default:
		return odd[int(b)%4]
	}
}

// xattrNames are attributes kiln stores as they come, in the inode or a
// block of their own; ACLs it converts.
var xattrNames = []string{
	"user.a", "user.b", "security.capability", "trusted.overlay.opaque", "user." + strings.Repeat("long", 20),
	"system.posix_acl_access", "system.posix_acl_default",
}

func (s *source) entry() Entry {
	h := tar.Header{
		Mode:   int64(s.byte())<<4 | int64(s.byte()>>4),
		Uid:    s.id(),
		Gid:    s.id(),
		Format: tar.FormatPAX,
	}
	h.Mode &= 0o7777
	h.ModTime = s.time()
	h.AccessTime, h.ChangeTime = h.ModTime.Add(time.Second), h.ModTime.Add(time.Minute)
	for range s.intn(3) {
		if h.PAXRecords == nil {
			h.PAXRecords = map[string]string{}
		}
		name := s.pick(xattrNames)
		h.PAXRecords["SCHILY.xattr."+name] = s.xattrValue(strings.HasPrefix(name, "system.posix_acl"))
	}
	var content []byte
	switch s.intn(10) {
	case 0, 1, 2:
		h.Typeflag = tar.TypeDir
	case 3, 4, 5:
		h.Typeflag = tar.TypeReg
	case 6, 7:
		h.Typeflag = tar.TypeSymlink
		h.Linkname = s.path(targetPath)
	case 8:
		// To a file named before, mostly: a link to nothing fails.
		h.Typeflag = tar.TypeLink
		if b := s.byte(); len(s.files) > 0 && b < 240 {
			h.Linkname = s.files[int(b)%len(s.files)]
		} else if b < 240 {
			h.Typeflag = tar.TypeReg
		} else {
			h.Linkname = s.path(filePath)
		}
	case 9:
		h.Typeflag = []byte{tar.TypeChar, tar.TypeBlock, tar.TypeFifo}[s.intn(3)]
		if h.Typeflag != tar.TypeFifo {
			h.Devmajor, h.Devminor = s.device()
		}
	}
	if h.Typeflag == tar.TypeDir {
		h.Name = s.path(dirPath)
	} else {
		h.Name = s.path(filePath)
	}
	if h.Typeflag == tar.TypeReg {
		content = s.content()
		h.Size = int64(len(content))
	}
	return Entry{Header: h, Content: content}
}

// bigDir is a directory of 100 to 600 empty files, with names long
// enough that it takes several blocks: a hashed directory in ext4.
func (s *source) bigDir() []Entry {
	dir := s.path(dirPath)
	n, long := 100+s.intn(6)*100, 1+s.intn(60)
	mt := s.time()
	es := []Entry{{Header: tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mt, Format: tar.FormatPAX}}}
	dir = strings.TrimSuffix(dir, "/")
	for i := range n {
		name := fmt.Sprintf("%s/%s%d", dir, strings.Repeat("x", long), i)
		es = append(es, Entry{Header: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, ModTime: mt, Format: tar.FormatPAX}})
	}
	return es
}

// time is mostly of this century, with nanoseconds; now and then before
// 1970, past 2038, at either end of what ext4 holds or beyond.
func (s *source) time() time.Time {
	ns, off := int64(s.byte())*3_900_000, int64(s.byte())*100_003
	switch s.intn(16) {
	case 0:
		return time.Unix(-off*100, ns) // back to 1887
	case 1:
		return time.Unix(1<<31+off*1000, ns) // 2038 to 2846
	case 2:
		return time.Unix(-1<<31+off%3-1, ns) // 1901
	case 3:
		return time.Unix(3<<32-1<<31+off%3-2, ns) // 2446
	case 4:
		return time.Unix(0, 0)
	}
	return time.Unix(1_600_000_000+off, ns)
}

// xattrValue is a short value, now and then one too big for an inode or
// a block; for ACLs, mostly one in the form tar holds them (version 2,
// 8-byte entries).
func (s *source) xattrValue(acl bool) string {
	if !acl || s.byte() == 255 {
		if s.byte() == 255 {
			return string(s.fill(1000 * s.intn(6)))
		}
		return string(s.fill(s.intn(4) * s.intn(60)))
	}
	b := []byte{2, 0, 0, 0}
	for range s.intn(8) {
		tag := []uint16{0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x01, 0x20, 0x40}[s.intn(9)]
		perm, id := s.byte()&7, uint32(s.byte())
		if tag == 0x02 || tag == 0x08 {
			id += uint32(s.byte()) << 24
		} else {
			id = 0xffffffff
		}
		b = append(b, byte(tag), byte(tag>>8), perm, 0, byte(id), byte(id>>8), byte(id>>16), byte(id>>24))
	}
	return string(b)
}

// id is an owner: root, a small id, or one past 16 bits.
func (s *source) id() int {
	switch b := s.byte(); {
	case b < 128:
		return 0
	case b < 250:
		return int(b)
	default:
		return 4_000_000_000 + int(b)
	}
}

// device is a device number, of the old 8-bit form or the new 12:20,
// out of range now and then.
func (s *source) device() (int64, int64) {
	b := s.byte()
	if b == 255 {
		return 0x1000, 0
	}
	major, minor := int64(s.byte()), int64(s.byte())
	if b&1 == 1 {
		major = major<<4 | int64(b>>4)
		minor = minor<<12 | int64(s.byte())<<4 | int64(b>>4)
	}
	return major, minor
}

// fill returns n bytes that depend on the input without using much of it.
func (s *source) fill(n int) []byte {
	b := make([]byte, n)
	seed := s.byte()
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// content is a file's content: empty, a few bytes, or blocks of data and
// zeros (which the tree keeps as holes) with a tail; now and then past
// the 1 MiB the tree reads at a time, or in more pieces than an ext4
// inode's four extents, or the 340 of one extent block.
func (s *source) content() []byte {
	switch s.intn(4) {
	case 0:
		return nil
	case 1:
		return s.fill(1 + s.intn(100))
	}
	var b []byte
	mask := uint16(s.byte()) | uint16(s.byte())<<8
	for i := range 1 + s.intn(16) {
		if mask>>i&1 == 1 {
			b = append(b, s.fill(4096)...)
		} else {
			b = append(b, make([]byte, 4096)...)
		}
	}
	switch s.intn(32) {
	case 0:
		b = append(b, make([]byte, 1<<20-len(b)+4096*s.intn(3))...)
		b = append(b, s.fill(10)...)
	case 1:
		for range 341 + s.intn(4) {
			b = append(b, make([]byte, 4096)...)
			b = append(b, s.fill(4096)...)
		}
	}
	return append(b, s.fill(s.intn(4)*s.intn(256)*s.intn(9))...)
}
