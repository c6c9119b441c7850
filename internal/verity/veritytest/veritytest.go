// Package veritytest checks kiln's dm-verity disks with veritysetup, the
// reference implementation, in tests.
package veritytest

import (
	"fmt"
	"os/exec"
	"strconv"
	"testing"

	"github.com/kilnfs/kiln/internal/testenv"
	"github.com/kilnfs/kiln/internal/verity"
)

// Verify runs `veritysetup verify` on a disk with the root hash and hash
// offset kiln reported for it, as a host would before handing both to a
// VMM. It skips the test when veritysetup is not installed.
func Verify(t testing.TB, disk string, info verity.Info) error {
	t.Helper()
	vs, err := exec.LookPath("veritysetup")
	if err != nil {
		testenv.Unavailable(t, "veritysetup (Debian package cryptsetup-bin) is not installed")
	}
	out, err := exec.Command(vs, "verify", disk, disk, info.RootHash, "--hash-offset="+strconv.FormatInt(info.HashOffset, 10)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("veritysetup verify %s: %w: %s", disk, err, out)
	}
	return nil
}
