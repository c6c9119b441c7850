// Package config is kiln serve's configuration: a TOML file (by default
// /etc/kiln/config.toml) whose settings have sensible defaults, so that an
// empty or missing file is a working configuration.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/guest"
)

// DefaultPath is where kiln serve looks for its configuration.
const DefaultPath = "/etc/kiln/config.toml"

// Config is kiln serve's configuration.
type Config struct {
	// Version of the file format.
	Version int `toml:"version"`
	// Root holds kiln's state: snapshots, layers, built images.
	Root string `toml:"root"`
	// Address is the unix socket kiln serves containerd on. Its directory
	// must not be world-writable.
	Address string `toml:"address"`
	// SocketMode is the socket's permission bits, in octal; others may
	// get none (whoever can connect drives kiln).
	SocketMode string `toml:"socket_mode"`
	// SocketGroup owns the socket (a group name or number), so that its
	// members may connect when SocketMode lets the group in; empty: the
	// group kiln runs as.
	SocketGroup string `toml:"socket_group"`
	// ContainerdAddress is containerd's socket, for its content store.
	ContainerdAddress string `toml:"containerd_address"`
	// LogLevel is debug, info, warn or error; LogFormat text or json.
	LogLevel  string `toml:"log_level"`
	LogFormat string `toml:"log_format"`
	// MetricsAddress serves Prometheus metrics on /metrics over HTTP
	// (host:port); empty disables them.
	MetricsAddress string `toml:"metrics_address"`

	Snapshotter Snapshotter `toml:"snapshotter"`
	Build       Build       `toml:"build"`
	Limits      Limits      `toml:"limits"`
	Share       Share       `toml:"share"`
}

// Share configures the use of finished root filesystems kept beside
// their images in the registry (kiln push publishes them): a fleet
// builds each image once. kiln learns which image a layer belongs to
// from containerd's snapshot labels, which the drop-in kiln
// containerd-config writes turns on.
type Share struct {
	// Pull looks for a published rootfs of the same build before building
	// an image's disk, and uses it once it verifies; otherwise kiln
	// builds as before.
	Pull bool `toml:"pull"`
	// Push publishes every disk kiln builds for an image's top layer
	// beside the image, in the background (push access needed).
	Push bool `toml:"push"`
	// Lazy boots an image before it has arrived when a chunked rootfs
	// of the same build is published beside it (kiln push --chunked):
	// containerd downloads none of its layers, and its disk is served as
	// a file (through FUSE: /dev/fuse is needed) whose chunks are
	// fetched, checked and cached when first read. Other images are
	// pulled as before.
	Lazy bool `toml:"lazy"`
	// LazyTimeout bounds each read of a lazily loaded disk: one whose
	// chunks take longer fails with an I/O error.
	LazyTimeout string `toml:"lazy_timeout"`
	// LazyPrefetch fetches the rest of a lazily loaded disk in the
	// background, after the chunks its first boot read, then writes the
	// disk out whole: later containers, and the next kiln, use that.
	LazyPrefetch bool `toml:"lazy_prefetch"`
	// LazyBootWindow is how long after the first container or view on
	// a lazily loaded disk its reads are taken as its boot's, recorded as
	// its boot profile.
	LazyBootWindow string `toml:"lazy_boot_window"`
	// LazyCacheMaxSize bounds the chunk cache under the root ("0": no
	// bound); the chunks used least recently go first. A disk written
	// out whole needs its chunks no more.
	LazyCacheMaxSize string `toml:"lazy_cache_max_size"`
	// HostsDir holds containerd's hosts.toml files (mirrors, TLS,
	// headers); the rootfs is looked up and published on the registry
	// itself. Credentials are read from the docker config of the user
	// kiln runs as ($DOCKER_CONFIG, ~/.docker/config.json).
	HostsDir string `toml:"hosts_dir"`
	// Insecure lists registries (host[:port]) reached over plain HTTP or
	// unverified TLS; loopback registries always may be.
	Insecure []string `toml:"insecure"`
}

// CacheBudget is LazyCacheMaxSize in bytes, 0 for no bound.
func (s Share) CacheBudget() (int64, error) {
	if strings.TrimSpace(s.LazyCacheMaxSize) == "0" {
		return 0, nil
	}
	n, err := ParseSize(s.LazyCacheMaxSize)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("config: share.lazy_cache_max_size %q: want 0 (no bound) or a size such as 20G", s.LazyCacheMaxSize)
	}
	return n, nil
}

// Limits caps what one image may make kiln do: images are untrusted,
// and a few kilobytes of layer can decompress into terabytes. An image
// past a limit fails to unpack with an error naming the limit, the layer
// and the entry. Sizes are as for build.size ("64G"); "0" is no limit.
type Limits struct {
	// LayerBytes and ImageBytes cap the uncompressed tar of one layer,
	// and of all of an image's layers.
	LayerBytes string `toml:"layer_bytes"`
	ImageBytes string `toml:"image_bytes"`
	// Entries caps the entries of all of an image's layers.
	Entries int64 `toml:"entries"`
	// PathDepth caps the components of an entry's name.
	PathDepth int `toml:"path_depth"`
	// FileSize caps a file's logical size, sparse or not (never above
	// what ext4 holds, 16 TiB).
	FileSize string `toml:"file_size"`
	// XattrBytes caps an entry's extended attributes, names and values.
	XattrBytes string `toml:"xattr_bytes"`
}

// DefaultLimits are kiln's default limits, as the configuration says them.
func DefaultLimits() Limits {
	d := fstree.DefaultLimits()
	return Limits{
		LayerBytes: FormatSize(d.LayerBytes),
		ImageBytes: FormatSize(d.ImageBytes),
		Entries:    d.Entries,
		PathDepth:  d.PathDepth,
		FileSize:   FormatSize(d.FileSize),
		XattrBytes: FormatSize(d.XattrBytes),
	}
}

// Set changes one limit by its name in [limits], as `kiln convert
// --limit NAME=VALUE` does.
func (l *Limits) Set(name, value string) error {
	switch name {
	case "layer_bytes":
		l.LayerBytes = value
	case "image_bytes":
		l.ImageBytes = value
	case "file_size":
		l.FileSize = value
	case "xattr_bytes":
		l.XattrBytes = value
	case "entries", "path_depth":
		v, err := strconv.ParseInt(value, 10, 64)
		if err != nil || v < 0 || v > math.MaxInt32 && name == "path_depth" {
			return fmt.Errorf("limit %s %q: want a number, or 0 for none", name, value)
		}
		if name == "entries" {
			l.Entries = v
		} else {
			l.PathDepth = int(v)
		}
	default:
		return fmt.Errorf("no limit %q (there are layer_bytes, image_bytes, entries, path_depth, file_size, xattr_bytes)", name)
	}
	return nil
}

// Parse turns the configured limits into the tree's.
func (l Limits) Parse() (fstree.Limits, error) {
	var out fstree.Limits
	for _, s := range []struct {
		name string
		val  string
		to   *int64
	}{
		{"layer_bytes", l.LayerBytes, &out.LayerBytes},
		{"image_bytes", l.ImageBytes, &out.ImageBytes},
		{"file_size", l.FileSize, &out.FileSize},
		{"xattr_bytes", l.XattrBytes, &out.XattrBytes},
	} {
		if strings.TrimSpace(s.val) == "0" {
			continue
		}
		v, err := ParseSize(s.val)
		if err != nil || v == 0 {
			return out, fmt.Errorf("config: limits.%s %q: want a size such as 64G, or 0 for none", s.name, s.val)
		}
		*s.to = v
	}
	if l.Entries < 0 || l.PathDepth < 0 {
		return out, fmt.Errorf("config: limits.entries and limits.path_depth: want 0 (none) or more")
	}
	out.Entries, out.PathDepth = l.Entries, l.PathDepth
	return out, nil
}

// FormatSize writes a size the way ParseSize reads it, in the largest
// unit that divides it.
func FormatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if n != 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// Snapshotter configures how snapshots are served.
type Snapshotter struct {
	// ContainerMode is how containers get their writable filesystem:
	// "overlay" (a small scratch disk over the image's shared read-only
	// disk) or "copy" (one whole bootable copy of the image's disk, for
	// shims that take a single disk). A container's snapshot label
	// containerd.io/snapshot/kiln.container-mode overrides it.
	ContainerMode string `toml:"container_mode"`
	// BlockDevices makes Mounts return attached loop devices
	// ({type: ext4, source: /dev/loopN}) instead of files, for shims that
	// accept only block devices (Kata, firecracker-containerd).
	BlockDevices bool `toml:"block_devices"`
	// DefaultSize is the size of an overlay-mode container's scratch
	// disk, and of a container without a parent, unless the
	// containerd.io/snapshot/max-size label says otherwise.
	DefaultSize string `toml:"default_size"`
	// EagerBuild builds an image's disk as soon as its top layer is
	// committed (otherwise at the first container, view or export).
	EagerBuild bool `toml:"eager_build"`
	// MaxConcurrentBuilds bounds the disks built at once ahead of need
	// (eager builds), and, apart, those somebody waits for (a container
	// start, an export), which never queue behind eager ones; 0 is half
	// the CPUs.
	MaxConcurrentBuilds int `toml:"max_concurrent_builds"`
	// UnusedDiskGrace is how long a disk that no image's top and no
	// container or view needs is kept before it is removed (a duration
	// such as "1m"). It covers a pull that has built its top layer's disk
	// but not yet recorded the image.
	UnusedDiskGrace string `toml:"unused_disk_grace"`
}

// Build configures how image rootfs files are built.
type Build struct {
	// Size is "auto" (content plus headroom) or a size such as "4G".
	Size string `toml:"size"`
	// Writer lays out the ext4: "kiln" (kiln's own, one pass, the
	// default) or "e2fsprogs" (mke2fs and debugfs, the reference).
	Writer string `toml:"writer"`
	// Inject lists guest pieces to add to every image: "init", "agent",
	// "network" (see kiln convert --inject). Empty: the image, exactly.
	Inject []string `toml:"inject"`
	// InjectDir is a bundle of the platform's own to add (a directory
	// with a manifest.toml).
	InjectDir string `toml:"inject_dir"`
	// Force lets injected files replace files an image has.
	Force bool `toml:"force"`
	// GuestBinDir holds kiln-init and kiln-agent; empty: next to kiln, in
	// $PATH, or in /usr/local/libexec/kiln and /usr/libexec/kiln.
	GuestBinDir string `toml:"guest_bin_dir"`
	// Verity appends a dm-verity hash tree to every image's disk (see
	// kiln convert --verity); the snapshotter reports its root hash in
	// the labels of the image's snapshot.
	Verity bool `toml:"verity"`
}

// Default returns the configuration an empty file gives.
func Default() Config {
	return Config{
		Version:           1,
		Root:              "/var/lib/kiln",
		Address:           "/run/kiln/kiln.sock",
		SocketMode:        "0660",
		ContainerdAddress: "/run/containerd/containerd.sock",
		LogLevel:          "info",
		LogFormat:         "text",
		Snapshotter: Snapshotter{
			ContainerMode:   "overlay",
			DefaultSize:     "1G",
			EagerBuild:      true,
			UnusedDiskGrace: "1m",
		},
		// An empty list, not nil: it is what "inject = []", as Encode
		// writes it, loads as.
		Build:  Build{Size: "auto", Writer: "kiln", Inject: []string{}},
		Limits: DefaultLimits(),
		Share: Share{
			HostsDir: "/etc/containerd/certs.d", Insecure: []string{},
			LazyTimeout: "30s", LazyPrefetch: true, LazyBootWindow: "1m", LazyCacheMaxSize: "10G",
		},
	}
}

// Load reads a configuration file over the defaults. A missing file at
// the default path is not an error; a missing file that was asked for is.
func Load(path string, explicit bool) (Config, error) {
	c := Default()
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var sme *toml.StrictMissingError
		if errors.As(err, &sme) {
			return c, fmt.Errorf("config %s: %s", path, sme.String())
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return c, fmt.Errorf("config %s:%d:%d: %v", path, row, col, de)
		}
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, c.Validate()
}

// Validate checks values that the file format cannot.
func (c Config) Validate() error {
	if c.Version != 1 {
		return fmt.Errorf("config: unsupported version %d (want 1)", c.Version)
	}
	if c.Root == "" || c.Address == "" {
		return errors.New("config: root and address must be set")
	}
	if _, err := ParseSocketMode(c.SocketMode); err != nil {
		return fmt.Errorf("config: socket_mode: %w", err)
	}
	if _, err := ParseSize(c.Build.Size); err != nil {
		return fmt.Errorf("config: build.size: %w", err)
	}
	if _, err := build.WriterNamed(c.Build.Writer); err != nil {
		return fmt.Errorf("config: build.writer: %w", err)
	}
	if _, err := guest.ParsePieces(strings.Join(c.Build.Inject, ",")); err != nil {
		return fmt.Errorf("config: build.inject: %w", err)
	}
	if _, err := ParseSize(c.Snapshotter.DefaultSize); err != nil {
		return fmt.Errorf("config: snapshotter.default_size: %w", err)
	}
	switch c.Snapshotter.ContainerMode {
	case "overlay", "copy":
	default:
		return fmt.Errorf("config: snapshotter.container_mode %q: want overlay or copy", c.Snapshotter.ContainerMode)
	}
	if d, err := time.ParseDuration(c.Snapshotter.UnusedDiskGrace); err != nil || d < 0 {
		return fmt.Errorf("config: snapshotter.unused_disk_grace %q: want a duration such as 1m", c.Snapshotter.UnusedDiskGrace)
	}
	if d, err := time.ParseDuration(c.Share.LazyTimeout); err != nil || d <= 0 {
		return fmt.Errorf("config: share.lazy_timeout %q: want a duration such as 30s", c.Share.LazyTimeout)
	}
	if d, err := time.ParseDuration(c.Share.LazyBootWindow); err != nil || d <= 0 {
		return fmt.Errorf("config: share.lazy_boot_window %q: want a duration such as 1m", c.Share.LazyBootWindow)
	}
	if _, err := c.Share.CacheBudget(); err != nil {
		return err
	}
	if c.Snapshotter.MaxConcurrentBuilds < 0 {
		return fmt.Errorf("config: snapshotter.max_concurrent_builds %d: want 0 (automatic) or more", c.Snapshotter.MaxConcurrentBuilds)
	}
	if _, err := c.Limits.Parse(); err != nil {
		return err
	}
	switch c.LogFormat {
	case "", "text", "json":
	default:
		return fmt.Errorf("config: log_format %q: want text or json", c.LogFormat)
	}
	return nil
}

// Encode renders the configuration as TOML.
func (c Config) Encode() ([]byte, error) { return toml.Marshal(c) }

// ParseSocketMode reads a socket's permission bits in octal ("0660").
// Modes that let every local user connect are refused: whoever can
// connect makes kiln create, write and remove disks.
func ParseSocketMode(s string) (os.FileMode, error) {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o777 {
		return 0, fmt.Errorf("%q: want octal permission bits such as 0660", s)
	}
	if v&0o007 != 0 {
		return 0, fmt.Errorf("%q lets every local user connect: want at most 0770", s)
	}
	return os.FileMode(v), nil
}

// ParseSize reads "auto" (0) or a size with an optional K/M/G/T suffix
// (binary multiples; "MiB", "MB" and "M" are the same).
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "auto" {
		return 0, nil
	}
	num := strings.TrimRight(strings.ToUpper(s), "IB")
	mult := int64(1)
	if n := len(num); n > 0 {
		switch num[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("%q: want auto or a size such as 2G", s)
	}
	return v * mult, nil
}
