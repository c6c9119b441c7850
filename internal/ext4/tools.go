package ext4

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
)

// e2fsprogs installs its tools in /usr/sbin, which many distributions
// leave out of an unprivileged user's PATH; kiln needs no privileges, so
// it looks there too.
var sbinDirs = []string{"/usr/sbin", "/sbin"}

// toolPath returns where an e2fsprogs tool is: found in PATH, else in an
// sbin directory, else its bare name (running it then fails with a clear
// "not found").
func toolPath(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}

// tool is exec.CommandContext for an e2fsprogs tool.
func tool(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, toolPath(name), args...)
}
