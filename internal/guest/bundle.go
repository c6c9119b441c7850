package guest

import (
	_ "embed"
	"fmt"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Piece names one part of the guest tooling that can be injected into a
// root filesystem.
type Piece string

const (
	// PieceInit installs kiln-init as /.kiln/init together with the image
	// config it reads. It is PID 1 for images without an init system; it also
	// configures the network and starts /.kiln/agent when present.
	PieceInit Piece = "init"
	// PieceAgent installs kiln-agent as /.kiln/agent. On systemd images it
	// also installs and enables kiln-agent.service and loads the vsock
	// transport module; otherwise kiln-init starts it.
	PieceAgent Piece = "agent"
	// PieceNetwork configures the network from the kernel command line on
	// systemd images, through kiln-network.service running
	// "/.kiln/init --network-only". Without systemd, kiln-init does it.
	PieceNetwork Piece = "network"
)

// AllPieces lists every piece in the order they are documented.
var AllPieces = []Piece{PieceInit, PieceAgent, PieceNetwork}

// ParsePieces parses a comma-separated list such as "init,agent,network".
// Blank entries are ignored and duplicates are dropped; unknown names are
// reported together in one error.
func ParsePieces(s string) ([]Piece, error) {
	var (
		pieces  []Piece
		unknown []string
		seen    = map[Piece]bool{}
	)
	for _, field := range strings.Split(s, ",") {
		p := Piece(strings.ToLower(strings.TrimSpace(field)))
		switch {
		case p == "":
			continue
		case !p.valid():
			unknown = append(unknown, fmt.Sprintf("%q", field))
		case !seen[p]:
			seen[p] = true
			pieces = append(pieces, p)
		}
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("unknown guest piece(s) %s; valid pieces are %s",
			strings.Join(unknown, ", "), joinPieces(AllPieces))
	}
	return pieces, nil
}

func (p Piece) valid() bool {
	for _, known := range AllPieces {
		if p == known {
			return true
		}
	}
	return false
}

func joinPieces(pieces []Piece) string {
	names := make([]string, len(pieces))
	for i, p := range pieces {
		names[i] = string(p)
	}
	return strings.Join(names, ", ")
}

// File is one entry to write into the guest root filesystem. Exactly one of
// Dir, Symlink, Source or Data describes its content (an empty regular file
// has none of them).
type File struct {
	// Path is absolute inside the guest, e.g. "/.kiln/init".
	Path string
	// Mode holds the permission bits, e.g. 0755, including the setuid,
	// setgid and sticky bits in their usual octal places (01777).
	Mode uint32
	// UID and GID own the entry; kiln's files are root's.
	UID, GID uint32
	// Dir marks a directory. Directories are listed before their contents;
	// one that already exists in the image should be left as it is.
	Dir bool
	// Symlink, when non-empty, makes the entry a symlink with this target.
	Symlink string
	// Source is a host file whose content is copied (the guest binaries).
	Source string
	// Data is inline content (units, configuration).
	Data []byte
}

// Paths of the systemd integration files inside the guest.
const (
	systemdUnitDir     = "/etc/systemd/system"
	AgentUnitPath      = systemdUnitDir + "/kiln-agent.service"
	NetworkUnitPath    = systemdUnitDir + "/kiln-network.service"
	AgentUnitWantsPath = systemdUnitDir + "/multi-user.target.wants/kiln-agent.service"
	// kiln-network.service is wanted by sysinit.target so it joins every
	// boot transaction early; its own ordering puts it before
	// network-pre.target and thus before any network manager.
	NetworkUnitWantsPath = systemdUnitDir + "/sysinit.target.wants/kiln-network.service"
	VsockModulesPath     = "/etc/modules-load.d/kiln-vsock.conf"
)

var (
	//go:embed systemd/kiln-agent.service
	agentUnit []byte
	//go:embed systemd/kiln-network.service
	networkUnit []byte
	//go:embed systemd/kiln-vsock.conf
	vsockModules []byte
)

func clone(b []byte) []byte { return append([]byte(nil), b...) }

// Bundle lists the files to write into a root filesystem for the given
// pieces. binDir holds the host's kiln-init and kiln-agent binaries, which
// must be statically linked ELF executables. hasSystemd tells
// whether the image boots with systemd, which decides whether systemd units
// or kiln-init start the agent and configure the network.
//
// The result is sorted by path, so every directory precedes its contents.
func Bundle(pieces []Piece, binDir string, hasSystemd bool) ([]File, error) {
	want := map[Piece]bool{}
	for _, p := range pieces {
		if !p.valid() {
			return nil, fmt.Errorf("unknown guest piece %q; valid pieces are %s", p, joinPieces(AllPieces))
		}
		want[p] = true
	}
	if len(want) == 0 {
		return nil, nil
	}
	if !hasSystemd && !want[PieceInit] {
		// Without systemd nothing but kiln-init would start the agent or
		// apply the network configuration.
		for _, p := range []Piece{PieceAgent, PieceNetwork} {
			if want[p] {
				return nil, fmt.Errorf("guest piece %q needs systemd in the image or the %q piece: "+
					"without systemd, kiln-init starts the agent and configures the network", p, PieceInit)
			}
		}
	}

	b := newFileSet()
	if want[PieceInit] || (want[PieceNetwork] && hasSystemd) {
		// kiln-network.service runs "/.kiln/init --network-only".
		if err := b.addBinary(InitPath, filepath.Join(binDir, InitBinary)); err != nil {
			return nil, err
		}
	}
	if want[PieceInit] {
		// The image's config is written last, into each image's own disk
		// (see ImageConfigPath): images that share their layers share
		// everything else.
		b.add(File{Path: ImageConfigPath, Mode: ImageConfigMode, Data: []byte{}})
		// kiln-init cannot create mount points on a read-only root.
		for _, dir := range mountPoints {
			b.add(File{Path: dir.path, Mode: dir.mode, Dir: true})
		}
	}
	if want[PieceAgent] {
		if err := b.addBinary(AgentPath, filepath.Join(binDir, AgentBinary)); err != nil {
			return nil, err
		}
		if hasSystemd {
			b.addData(AgentUnitPath, 0o644, agentUnit)
			b.addSymlink(AgentUnitWantsPath, AgentUnitPath)
			b.addData(VsockModulesPath, 0o644, vsockModules)
		}
	}
	if want[PieceNetwork] && hasSystemd {
		b.addData(NetworkUnitPath, 0o644, networkUnit)
		b.addSymlink(NetworkUnitWantsPath, NetworkUnitPath)
	}
	return b.sorted(), nil
}

// mountPoints are where kiln-init mounts the API filesystems; images often
// lack some of them.
var mountPoints = []struct {
	path string
	mode uint32
}{
	{"/dev", 0o755},
	{"/proc", 0o555},
	{"/run", 0o755},
	{"/sys", 0o555},
	{"/tmp", 0o1777},
}

// fileSet collects bundle entries, adding each parent directory once.
type fileSet map[string]File

func newFileSet() fileSet { return fileSet{} }

func (s fileSet) add(f File) {
	for dir := path.Dir(f.Path); dir != "/"; dir = path.Dir(dir) {
		if _, ok := s[dir]; !ok {
			s[dir] = File{Path: dir, Mode: 0o755, Dir: true}
		}
	}
	s[f.Path] = f
}

func (s fileSet) addData(p string, mode uint32, data []byte) {
	s.add(File{Path: p, Mode: mode, Data: clone(data)})
}

func (s fileSet) addSymlink(p, target string) {
	s.add(File{Path: p, Mode: 0o777, Symlink: target})
}

func (s fileSet) addBinary(p, source string) error {
	if err := CheckStaticELF(source); err != nil {
		return err
	}
	s.add(File{Path: p, Mode: 0o755, Source: source})
	return nil
}

func (s fileSet) sorted() []File {
	files := make([]File, 0, len(s))
	for _, f := range s {
		files = append(files, f)
	}
	// A parent path is a prefix of its children, so it sorts first.
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return files
}
