// Package inject adds kiln's guest pieces (init, agent, network bootstrap)
// or a user's own bundle to a root filesystem being built. The files are
// replayed as one last layer, so they get the same treatment as the
// image's own: root-owned, exact modes, reproducible. Nothing of the image
// is overwritten unless asked to.
package inject

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/guest"
)

// Options choose what to inject.
type Options struct {
	// Pieces are kiln's guest pieces.
	Pieces []guest.Piece
	// BinDir holds kiln-init and kiln-agent; empty: found next to the
	// kiln executable, in $PATH or in libexec.
	BinDir string
	// Dir is a user bundle: a directory with a manifest.toml.
	Dir string
	// Force lets injected files replace what the image has.
	Force bool
}

// ManifestName is the file in a user bundle that lists its entries.
const ManifestName = "manifest.toml"

// Set is what will be injected, read and checked up front so that a
// mistake fails before any layer is fetched. It holds nothing of any one
// image: the init piece leaves a placeholder for the image's config,
// which StampConfig fills in each image's own disk.
type Set struct {
	opts        Options
	user        []guest.File
	fingerprint string
}

// New prepares an injection. It returns nil when there is nothing to
// inject.
func New(opts Options) (*Set, error) {
	if len(opts.Pieces) == 0 && opts.Dir == "" {
		return nil, nil
	}
	if len(opts.Pieces) > 0 && opts.BinDir == "" {
		dir, err := guest.FindBinDir(guest.BinariesFor(opts.Pieces)...)
		if err != nil {
			return nil, err
		}
		opts.BinDir = dir
	}
	s := &Set{opts: opts}
	if opts.Dir != "" {
		user, err := ReadBundle(opts.Dir)
		if err != nil {
			return nil, err
		}
		s.user = user
	}
	fp, err := s.computeFingerprint()
	if err != nil {
		return nil, err
	}
	s.fingerprint = fp
	return s, nil
}

// Fingerprint identifies the injected content, for cache keys.
func (s *Set) Fingerprint() string {
	if s == nil {
		return ""
	}
	return s.fingerprint
}

// InitPath is where init was injected ("" if it was not): what the VM's
// kernel command line names with init=.
func (s *Set) InitPath() string {
	if s == nil {
		return ""
	}
	for _, p := range s.opts.Pieces {
		if p == guest.PieceInit {
			return guest.InitPath
		}
	}
	return ""
}

func (s *Set) computeFingerprint() (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "force=%t\x00", s.opts.Force)
	for _, p := range s.opts.Pieces {
		fmt.Fprintf(h, "piece=%s\x00", p)
	}
	for _, name := range guest.BinariesFor(s.opts.Pieces) {
		d, err := fileDigest(filepath.Join(s.opts.BinDir, name))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "bin=%s:%s\x00", name, d)
	}
	for _, f := range s.user {
		if err := describeFile(h, f); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func describeFile(w io.Writer, f guest.File) error {
	content := fmt.Sprintf("%x", sha256.Sum256(f.Data))
	if f.Source != "" {
		d, err := fileDigest(f.Source)
		if err != nil {
			return err
		}
		content = d
	}
	_, err := fmt.Fprintf(w, "file=%q %o %d:%d dir=%t link=%q %s\x00", f.Path, f.Mode, f.UID, f.GID, f.Dir, f.Symlink, content)
	return err
}

func fileDigest(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ErrClash is wrapped when an injected file would replace one of the
// image's.
var ErrClash = errors.New("the image already has")

// Apply adds the set's files to a tree that holds all of the image's
// layers.
func (s *Set) Apply(ctx context.Context, tree *fstree.Tree) error {
	if s == nil {
		return nil
	}
	var files []guest.File
	if len(s.opts.Pieces) > 0 {
		bundle, err := guest.Bundle(s.opts.Pieces, s.opts.BinDir, HasSystemd(tree))
		if err != nil {
			return err
		}
		files = append(files, bundle...)
	}
	files = append(files, s.user...)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if s.InitPath() != "" {
		if err := consoleNodes(tw, tree); err != nil {
			return err
		}
	}
	for _, f := range files {
		existing, err := lookup(tree, f)
		if err != nil {
			return fmt.Errorf("injecting %s: %w", f.Path, err)
		}
		if existing != nil {
			if f.Dir && existing.Inode().Type == fstree.TypeDir {
				continue // the image's directory stays as it is
			}
			if !s.opts.Force {
				return fmt.Errorf("injecting %s: %w %s (a %s); use --force to replace it",
					f.Path, ErrClash, f.Path, existing.Inode().Type)
			}
		}
		if err := writeEntry(tw, f, tree); err != nil {
			return fmt.Errorf("injecting %s: %w", f.Path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return tree.Apply(ctx, &buf, "kiln-inject")
}

// consoleNodes adds /dev/console and /dev/null when the image lacks them:
// the kernel gives init its console through /dev/console on the root, and
// a Go program started without one opens /dev/null or dies, before
// kiln-init can mount devtmpfs.
func consoleNodes(tw *tar.Writer, tree *fstree.Tree) error {
	for _, d := range []struct {
		name         string
		mode         int64
		major, minor int64
	}{{"dev/console", 0o600, 5, 1}, {"dev/null", 0o666, 1, 3}} {
		if n, err := tree.Resolve("/" + d.name); err != nil || n != nil {
			continue
		}
		if dir, err := tree.Resolve("/dev"); err == nil && dir != nil && dir.Inode().Type != fstree.TypeDir {
			continue // not a directory: leave the image's /dev alone
		}
		if err := tw.WriteHeader(&tar.Header{
			Name: d.name, Typeflag: tar.TypeChar, Mode: d.mode, Devmajor: d.major, Devminor: d.minor,
			ModTime: tree.Epoch(), Format: tar.FormatPAX,
		}); err != nil {
			return err
		}
	}
	return nil
}

// lookup finds what the image has where f goes: for a directory, symlinks
// are followed (a /lib that links to usr/lib is a directory); for anything
// else the last component is not (the file would replace the symlink).
func lookup(tree *fstree.Tree, f guest.File) (*fstree.Node, error) {
	if f.Dir {
		return tree.Resolve(f.Path)
	}
	dir, err := tree.Resolve(path.Dir(f.Path))
	if err != nil || dir == nil || dir.Inode().Type != fstree.TypeDir {
		return nil, err
	}
	return dir.Child(path.Base(f.Path)), nil
}

func writeEntry(tw *tar.Writer, f guest.File, tree *fstree.Tree) error {
	hdr := &tar.Header{
		Name: strings.TrimPrefix(f.Path, "/"), Mode: int64(f.Mode), Uid: int(f.UID), Gid: int(f.GID),
		ModTime: tree.Epoch(), Format: tar.FormatPAX,
	}
	var data []byte
	switch {
	case f.Dir:
		hdr.Typeflag = tar.TypeDir
	case f.Symlink != "":
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, f.Symlink
	default:
		hdr.Typeflag = tar.TypeReg
		data = f.Data
		if f.Source != "" {
			b, err := os.ReadFile(f.Source)
			if err != nil {
				return err
			}
			data = b
		}
		hdr.Size = int64(len(data))
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

// HasSystemd reports whether the image boots with systemd.
func HasSystemd(tree *fstree.Tree) bool {
	for _, p := range []string{"/lib/systemd/systemd", "/usr/lib/systemd/systemd"} {
		if n, err := tree.Resolve(p); err == nil && n != nil && n.Inode().Type == fstree.TypeReg {
			return true
		}
	}
	return false
}

// manifest is a user bundle's manifest.toml:
//
//	[[entry]]
//	path = "/opt/agent/agent"   # where it goes in the rootfs
//	source = "agent"            # file in the bundle directory
//	mode = "0755"
//	uid = 0
//	gid = 0
//
//	[[entry]]
//	path = "/etc/systemd/system/multi-user.target.wants/agent.service"
//	type = "symlink"            # file (default), dir or symlink
//	target = "/etc/systemd/system/agent.service"
type manifest struct {
	Entry []struct {
		Path   string `toml:"path"`
		Type   string `toml:"type"`
		Source string `toml:"source"`
		Target string `toml:"target"`
		Mode   string `toml:"mode"`
		UID    uint32 `toml:"uid"`
		GID    uint32 `toml:"gid"`
	} `toml:"entry"`
}

// ReadBundle reads a user bundle directory.
func ReadBundle(dir string) ([]guest.File, error) {
	raw, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, fmt.Errorf("inject bundle: %w", err)
	}
	var m manifest
	dec := toml.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("inject bundle %s: %w", filepath.Join(dir, ManifestName), err)
	}
	var files []guest.File
	for i, e := range m.Entry {
		where := fmt.Sprintf("inject bundle %s: entry %d (%q)", filepath.Join(dir, ManifestName), i+1, e.Path)
		if !path.IsAbs(e.Path) || path.Clean(e.Path) != e.Path || e.Path == "/" {
			return nil, fmt.Errorf("%s: path must be absolute and clean", where)
		}
		f := guest.File{Path: e.Path, UID: e.UID, GID: e.GID}
		mode := "0644"
		switch e.Type {
		case "", "file":
			if e.Source == "" || filepath.IsAbs(e.Source) || !filepath.IsLocal(e.Source) {
				return nil, fmt.Errorf("%s: source must name a file inside the bundle", where)
			}
			f.Source = filepath.Join(dir, e.Source)
			if fi, err := os.Stat(f.Source); err != nil || !fi.Mode().IsRegular() {
				return nil, fmt.Errorf("%s: source %s is not a regular file", where, e.Source)
			}
		case "dir":
			f.Dir, mode = true, "0755"
		case "symlink":
			if e.Target == "" {
				return nil, fmt.Errorf("%s: a symlink needs a target", where)
			}
			f.Symlink, mode = e.Target, "0777"
		default:
			return nil, fmt.Errorf("%s: type %q: want file, dir or symlink", where, e.Type)
		}
		if e.Mode != "" {
			mode = e.Mode
		}
		v, err := strconv.ParseUint(mode, 8, 32)
		if err != nil || v > 0o7777 {
			return nil, fmt.Errorf("%s: mode %q: want octal permission bits such as 0755", where, mode)
		}
		f.Mode = uint32(v)
		files = append(files, f)
	}
	// Parents before children.
	sort.SliceStable(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return files, nil
}
