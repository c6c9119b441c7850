package initconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/guest"
)

func TestImageInit(t *testing.T) {
	type file struct{ path, target string } // target: a symlink
	for _, tc := range []struct {
		name     string
		files    []file
		explicit string
		want     string
		status   int
		err      string
	}{
		{name: "config runs the workload", files: []file{{guest.ImageConfigPath, ""}, {"/sbin/init", ""}}},
		{name: "no config: /sbin/init", files: []file{{"/sbin/init", "/lib/systemd/systemd"}, {"/lib/systemd/systemd", ""}},
			want: "/sbin/init"},
		{name: "no config: systemd", files: []file{{"/lib/systemd/systemd", ""}}, want: "/lib/systemd/systemd"},
		{name: "no config, no init", files: []file{{"/bin/sh", ""}}, status: StatusNotFound,
			err: "neither a kiln image config (/.kiln/image-config.json) nor an init of its own (/sbin/init or /lib/systemd/systemd)"},
		{name: "dangling /sbin/init", files: []file{{"/sbin/init", "/lib/systemd/systemd"}}, status: StatusNotFound,
			err: "neither"},
		{name: "explicit wins over a config", files: []file{{guest.ImageConfigPath, ""}, {"/usr/bin/tini", ""}},
			explicit: "/usr/bin/tini", want: "/usr/bin/tini"},
		{name: "explicit missing", files: []file{{guest.ImageConfigPath, ""}}, explicit: "/sbin/runit",
			status: StatusNotFound, err: "kiln.init: executable /sbin/runit not found"},
		{name: "explicit relative", explicit: "sbin/init", status: StatusFailure, err: "not an absolute path"},
		{name: "explicit kiln-init", files: []file{{guest.InitPath, ""}}, explicit: "/.kiln/init",
			status: StatusFailure, err: "kiln-init itself"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tc.files {
				p := filepath.Join(root, f.path)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				var err error
				if f.target != "" {
					err = os.Symlink(f.target, p)
				} else {
					err = os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			got, err := ImageInit(root, tc.explicit)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || ExitStatus(err) != tc.status {
					t.Fatalf("ImageInit = %q, %v (status %d); want an error containing %q, status %d",
						got, err, ExitStatus(err), tc.err, tc.status)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("ImageInit = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
