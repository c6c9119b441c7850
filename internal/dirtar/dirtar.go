// Package dirtar writes a directory tree as a layer tar: numeric owners,
// full-precision times, xattrs, hard links and device nodes, names sorted.
// It can also read an overlayfs upper directory, whose whiteouts (0:0
// character devices) and opaque directories (the trusted.overlay.opaque or
// user.overlay.opaque xattr) become OCI whiteout entries.
package dirtar

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// OCI whiteout names.
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// Options change how a tree is read.
type Options struct {
	// Overlay reads root as an overlayfs upper directory.
	Overlay bool
}

// Write writes the tree at root to w as a tar in PAX format.
func Write(w io.Writer, root string, opts Options) error {
	tw := tar.NewWriter(w)
	type key struct{ dev, ino uint64 }
	links := map[key]string{}
	var walk func(rel string) error
	walk = func(rel string) error {
		p := filepath.Join(root, filepath.FromSlash(rel))
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		hdr := &tar.Header{
			Name:    rel,
			Mode:    int64(st.Mode & 0o7777),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
			Format:  tar.FormatPAX,
		}
		if rel == "" {
			hdr.Name = "./"
		}
		x, err := xattrs(p)
		if err != nil {
			return err
		}
		opaque := false
		if opts.Overlay {
			for _, k := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
				if x[k] == "y" {
					opaque = true
				}
			}
			for k := range x {
				if strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.") {
					delete(x, k)
				}
			}
			if st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 {
				// A whiteout: the name is deleted from lower layers.
				dir, base := path.Split(rel)
				return tw.WriteHeader(&tar.Header{
					Name: dir + whiteoutPrefix + base, Typeflag: tar.TypeReg, Mode: 0o600,
					ModTime: hdr.ModTime, Format: tar.FormatPAX,
				})
			}
		}
		for k, v := range x {
			if hdr.PAXRecords == nil {
				hdr.PAXRecords = map[string]string{}
			}
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			hdr.Typeflag = tar.TypeDir
			if rel != "" {
				hdr.Name += "/"
			}
		case unix.S_IFREG:
			k := key{uint64(st.Dev), st.Ino}
			if first, ok := links[k]; ok && st.Nlink > 1 {
				hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
				break
			}
			links[k] = rel
			hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		case unix.S_IFCHR, unix.S_IFBLK:
			hdr.Typeflag = tar.TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				hdr.Typeflag = tar.TypeBlock
			}
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			hdr.Typeflag = tar.TypeFifo
		default:
			return nil // sockets are not part of images
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return err
			}
		}
		if hdr.Typeflag != tar.TypeDir {
			return nil
		}
		if opaque {
			if err := tw.WriteHeader(&tar.Header{
				Name: path.Join(rel, opaqueMarker), Typeflag: tar.TypeReg, Mode: 0o600,
				ModTime: hdr.ModTime, Format: tar.FormatPAX,
			}); err != nil {
				return err
			}
		}
		ents, err := os.ReadDir(p)
		if err != nil {
			return err
		}
		names := make([]string, len(ents))
		for i, e := range ents {
			names[i] = e.Name()
		}
		sort.Strings(names)
		for _, n := range names {
			if err := walk(path.Join(rel, n)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(""); err != nil {
		return err
	}
	return tw.Close()
}

func xattrs(p string) (map[string]string, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return nil, nil //nolint:nilerr // no xattr support means none
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:sz]), "\x00"), "\x00") {
		if name == "" || strings.HasPrefix(name, "security.selinux") {
			continue
		}
		vsz, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, err
		}
		v := make([]byte, vsz)
		if _, err := unix.Lgetxattr(p, name, v); err != nil {
			return nil, err
		}
		out[name] = string(v)
	}
	return out, nil
}
