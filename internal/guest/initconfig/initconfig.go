// Package initconfig turns an image's OCI config into the process kiln-init
// starts: its argv, environment, working directory and credentials, resolved
// against the image's own /etc/passwd, /etc/group and PATH the way container
// runtimes do.
//
// Every function takes the guest root directory explicitly, so the same code
// runs inside the guest (root "/") and against an unpacked image on the host.
package initconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/moby/sys/user"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kilnfs/kiln/internal/guest"
)

// DefaultPath is the PATH given to a workload whose image sets none; it is
// the one Docker and containerd use.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// DefaultTerm is the TERM given to a workload whose image sets none. The
// workload's terminal is the kernel console, and the kernel starts init with
// the same value.
const DefaultTerm = "linux"

// Shell-style exit statuses for a workload that cannot be started.
const (
	StatusFailure       = 1
	StatusNotExecutable = 126
	StatusNotFound      = 127
)

// Error is a reason the workload cannot be started, with the exit status a
// shell would report for it.
type Error struct {
	Status int
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func errorf(status int, format string, args ...any) error {
	return &Error{Status: status, Err: fmt.Errorf(format, args...)}
}

// ExitStatus returns the shell-style exit status for an error from this
// package: 127 when the executable does not exist, 126 when it cannot be
// executed, 1 for anything else and 0 for nil.
func ExitStatus(err error) int {
	if err == nil {
		return 0
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return StatusFailure
}

// ErrNoImageConfig is what kiln-init reports for the empty placeholder of
// a disk that images sharing their layers share: kiln writes each image's
// config into that image's own disk.
var ErrNoImageConfig = errors.New("this disk holds no image config (" + guest.ImageConfigPath + " is empty): " +
	"images with the same layers share it, and kiln writes the image's config into the image's own disk " +
	"(kiln convert, kiln export, a container's disk: label the container's snapshot " +
	"containerd.io/snapshot/kiln.image=IMAGE when several images share its layers); " +
	"or give the command after \"--\" on the kernel command line")

// Process is the fully resolved workload.
type Process struct {
	// Args is argv, with Args[0] as the image gave it.
	Args []string
	// Path is the absolute path of the executable inside the guest.
	Path string
	// Env holds KEY=VALUE entries.
	Env []string
	// Dir is the absolute working directory inside the guest.
	Dir string
	// UID and GID are the credentials to run with; Groups are the
	// supplementary groups.
	UID, GID uint32
	Groups   []uint32
	// Home is the user's home directory from /etc/passwd, or "/".
	Home string
}

// ReadImageConfig reads an OCI image config document
// (application/vnd.oci.image.config.v1+json) and returns its "config"
// object.
func ReadImageConfig(file string) (v1.ImageConfig, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return v1.ImageConfig{}, fmt.Errorf("read image config: %w", err)
	}
	return ParseImageConfig(data)
}

// ParseImageConfig parses an OCI image config document.
func ParseImageConfig(data []byte) (v1.ImageConfig, error) {
	var img v1.Image
	if err := json.Unmarshal(data, &img); err != nil {
		return v1.ImageConfig{}, fmt.Errorf("parse image config: %w", err)
	}
	return img.Config, nil
}

// Load reads the image config that kiln installed under root and resolves
// the workload. args, when not empty, replace the image's Cmd, as arguments
// after the image name do for "docker run".
func Load(root string, args []string) (*Process, error) {
	file, err := hostPath(root, guest.ImageConfigPath)
	if err == nil {
		if fi, serr := os.Stat(file); serr == nil && fi.Size() == 0 && len(args) == 0 {
			return nil, &Error{Status: StatusFailure, Err: ErrNoImageConfig}
		}
		var cfg v1.ImageConfig
		if cfg, err = readConfigOrEmpty(file); err == nil {
			return Resolve(cfg, root, args)
		}
	}
	return nil, &Error{Status: StatusFailure, Err: err}
}

// readConfigOrEmpty reads an image config; the empty placeholder reads as
// an empty config (the command comes from the kernel command line).
func readConfigOrEmpty(file string) (v1.ImageConfig, error) {
	if fi, err := os.Stat(file); err == nil && fi.Size() == 0 {
		return v1.ImageConfig{}, nil
	}
	return ReadImageConfig(file)
}

// Resolve computes the workload for cfg in the root filesystem at root.
// args, when not empty, replace cfg.Cmd; the argv is Entrypoint followed by
// Cmd.
func Resolve(cfg v1.ImageConfig, root string, args []string) (*Process, error) {
	cmd := cfg.Cmd
	if len(args) > 0 {
		cmd = args
	}
	argv := append(append([]string(nil), cfg.Entrypoint...), cmd...)
	if len(argv) == 0 || argv[0] == "" {
		return nil, errorf(StatusFailure, "the image config has no Entrypoint or Cmd; "+
			"give a command after \"--\" on the kernel command line")
	}

	u, err := resolveUser(root, cfg.User)
	if err != nil {
		return nil, err
	}

	dir := cfg.WorkingDir
	if dir == "" {
		dir = "/"
	}
	dir = path.Clean("/" + dir)

	env := buildEnv(cfg.Env, u.Home)
	exe, err := lookExecutable(root, argv[0], dir, envValue(env, "PATH"))
	if err != nil {
		return nil, err
	}

	groups := make([]uint32, len(u.Sgids))
	for i, g := range u.Sgids {
		groups[i] = uint32(g)
	}
	return &Process{
		Args:   argv,
		Path:   exe,
		Env:    env,
		Dir:    dir,
		UID:    uint32(u.Uid),
		GID:    uint32(u.Gid),
		Groups: groups,
		Home:   u.Home,
	}, nil
}

// resolveUser resolves an image User field ("", "name", "uid", "name:group",
// "uid:gid", ...) against the image's passwd and group files with runc's
// rules: a numeric uid needs no passwd entry and then gets gid 0, and
// supplementary groups come from /etc/group only when no group is given.
func resolveUser(root, spec string) (*user.ExecUser, error) {
	passwd, err := readAccountFile(root, "/etc/passwd")
	if err != nil {
		return nil, err
	}
	group, err := readAccountFile(root, "/etc/group")
	if err != nil {
		return nil, err
	}
	defaults := &user.ExecUser{Uid: 0, Gid: 0, Home: "/"}
	u, err := user.GetExecUser(spec, defaults, passwd, group)
	if err != nil {
		if spec == "" {
			spec = "root"
		}
		return nil, errorf(StatusFailure, "image user %q: %w", spec, err)
	}
	return u, nil
}

// maxAccountFile bounds how much of /etc/passwd or /etc/group is read.
const maxAccountFile = 16 << 20

// readAccountFile returns an account database of the image without its
// comment lines, which the parser would otherwise read as an entry for uid 0.
// A missing file gives a nil reader and no error: numeric users need none.
func readAccountFile(root, name string) (io.Reader, error) {
	f, err := openInRoot(root, name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, errorf(StatusFailure, "open the image's %s: %w", name, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxAccountFile))
	if err != nil {
		return nil, errorf(StatusFailure, "read the image's %s: %w", name, err)
	}
	var kept bytes.Buffer
	for line := range bytes.Lines(data) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			kept.Write(line)
		}
	}
	return &kept, nil
}

// buildEnv returns the image environment completed with PATH, HOME and TERM
// when the image does not set them.
func buildEnv(imageEnv []string, home string) []string {
	env := append([]string(nil), imageEnv...)
	defaults := [][2]string{{"PATH", DefaultPath}, {"HOME", home}, {"TERM", DefaultTerm}}
	for _, kv := range defaults {
		if _, ok := lookupEnv(env, kv[0]); !ok {
			env = append(env, kv[0]+"="+kv[1])
		}
	}
	return env
}

// lookupEnv finds the last KEY=VALUE entry for key, the one exec uses.
func lookupEnv(env []string, key string) (string, bool) {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v, true
		}
	}
	return "", false
}

func envValue(env []string, key string) string {
	v, _ := lookupEnv(env, key)
	return v
}

// lookExecutable finds the guest path of the executable for argv0 as execvp
// would in the workload: a name with a slash is taken as a path (relative to
// dir), anything else is searched in pathEnv. It checks that the file is a
// regular file with an execute bit.
func lookExecutable(root, argv0, dir, pathEnv string) (string, error) {
	if strings.Contains(argv0, "/") {
		p := argv0
		if !path.IsAbs(p) {
			p = path.Join(dir, p)
		}
		if err := checkExecutable(root, p); err != nil {
			return "", err
		}
		return p, nil
	}

	var notExecutable error
	for _, d := range strings.Split(pathEnv, ":") {
		if d == "" {
			d = "." // An empty PATH entry means the working directory.
		}
		if !path.IsAbs(d) {
			d = path.Join(dir, d)
		}
		p := path.Join(d, argv0)
		err := checkExecutable(root, p)
		if err == nil {
			return p, nil
		}
		// Like execvp, keep looking after a match that cannot be run, but
		// report it if nothing better turns up.
		if ExitStatus(err) == StatusNotExecutable && notExecutable == nil {
			notExecutable = err
		}
	}
	if notExecutable != nil {
		return "", notExecutable
	}
	return "", errorf(StatusNotFound, "executable %q not found in PATH %q", argv0, pathEnv)
}

func checkExecutable(root, p string) error {
	fi, err := statInRoot(root, p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return errorf(StatusNotFound, "executable %s not found", p)
	case err != nil:
		return errorf(StatusNotExecutable, "executable %s: %w", p, err)
	case fi.IsDir():
		return errorf(StatusNotExecutable, "executable %s is a directory", p)
	case !fi.Mode().IsRegular():
		return errorf(StatusNotExecutable, "executable %s is not a regular file", p)
	case fi.Mode().Perm()&0o111 == 0:
		return errorf(StatusNotExecutable, "executable %s is not executable (mode %s)", p, fi.Mode().Perm())
	}
	return nil
}
