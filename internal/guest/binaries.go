package guest

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// libexecDirs are searched for the guest binaries after the running
// executable's directory and $PATH.
var libexecDirs = []string{"/usr/local/libexec/kiln", "/usr/libexec/kiln"}

// BinariesFor returns the host binaries that the pieces need.
func BinariesFor(pieces []Piece) []string {
	var needInit, needAgent bool
	for _, p := range pieces {
		switch p {
		case PieceInit, PieceNetwork:
			needInit = true
		case PieceAgent:
			needAgent = true
		}
	}
	var names []string
	if needInit {
		names = append(names, InitBinary)
	}
	if needAgent {
		names = append(names, AgentBinary)
	}
	return names
}

// FindBinDir returns the first directory that holds every named guest binary
// (see BinariesFor), looking next to the running executable, then in each
// $PATH entry, then in /usr/local/libexec/kiln and /usr/libexec/kiln.
func FindBinDir(names ...string) (string, error) {
	if len(names) == 0 {
		names = []string{InitBinary, AgentBinary}
	}
	var candidates []string
	if exe, err := os.Executable(); err == nil {
		if resolved, err := filepath.EvalSymlinks(exe); err == nil {
			exe = resolved
		}
		candidates = append(candidates, filepath.Dir(exe))
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir != "" && filepath.IsAbs(dir) {
			candidates = append(candidates, dir)
		}
	}
	candidates = append(candidates, libexecDirs...)
	return findBinDirIn(candidates, names)
}

func findBinDirIn(candidates, names []string) (string, error) {
	for _, dir := range candidates {
		if hasAll(dir, names) {
			return dir, nil
		}
	}
	return "", fmt.Errorf("guest binaries %s not found next to the kiln executable, in $PATH, or in %s",
		strings.Join(names, " and "), strings.Join(libexecDirs, " or "))
}

func hasAll(dir string, names []string) bool {
	for _, name := range names {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || !fi.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// CheckStaticELF reports an error unless path is a statically linked ELF
// executable. The guest binaries run in images that may have no C library,
// or a different one, so they must not need a dynamic loader.
func CheckStaticELF(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("guest binary %s does not exist; build it with "+
			"CGO_ENABLED=0 go build ./cmd/%s", path, filepath.Base(path))
	}
	if err != nil {
		return fmt.Errorf("guest binary: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("guest binary %s is not a regular file", path)
	}
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("guest binary %s is not an ELF executable: %w", path, err)
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("guest binary %s is an ELF %s, not an executable", path, f.Type)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("guest binary %s is dynamically linked (it needs a program interpreter); "+
				"rebuild it with CGO_ENABLED=0", path)
		}
	}
	// A static PIE has no interpreter but could still, in theory, list
	// shared libraries; those would never be loaded.
	if libs, err := f.ImportedLibraries(); err == nil && len(libs) > 0 {
		return fmt.Errorf("guest binary %s needs shared libraries (%s); rebuild it with CGO_ENABLED=0",
			path, strings.Join(libs, ", "))
	}
	return nil
}
