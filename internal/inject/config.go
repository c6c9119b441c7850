package inject

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"time"

	"github.com/kilnfs/kiln/internal/ext4"
	"github.com/kilnfs/kiln/internal/guest"
)

// NeedsConfig reports whether a disk was built with the init piece and
// still holds the empty placeholder for the image's config.
func NeedsConfig(disk *os.File) (bool, error) {
	found, size, err := ext4.Has(disk, guest.ImageConfigPath)
	return found && size == 0, err
}

// StampConfig writes an image's config document into a disk that needs
// it (see NeedsConfig), replacing the placeholder. under, if not empty, is
// a directory the guest's root is found in instead, such as the upper
// directory of an overlay scratch disk; it and kiln's directory in it are
// made as needed. epoch is the time the entries get, the disk's own
// epoch, so that the result is reproducible.
func StampConfig(ctx context.Context, disk *os.File, config []byte, under string, epoch time.Time, workDir string) error {
	if len(config) == 0 || !json.Valid(config) {
		return errors.New("injecting the image config: it is empty or not valid JSON")
	}
	var entries []ext4.Entry
	if under != "" {
		entries = append(entries,
			ext4.Entry{Path: under, Dir: true, Mode: 0o755, Time: epoch},
			ext4.Entry{Path: path.Join(under, guest.Dir), Dir: true, Mode: 0o755, Time: epoch})
	}
	entries = append(entries, ext4.Entry{
		Path: path.Join("/", under, guest.ImageConfigPath), Data: config, Mode: guest.ImageConfigMode, Time: epoch,
	})
	if err := ext4.Add(ctx, disk, workDir, entries); err != nil {
		return fmt.Errorf("injecting the image config: %w", err)
	}
	return nil
}
