package switchroot

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

func TestRootFromCmdline(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    Root
		err     string
	}{
		{"console=ttyS0 root=/dev/vda", Root{Device: "/dev/vda", FSType: "ext4", Flags: unix.MS_RDONLY, Init: "/sbin/init"}, ""},
		{"root=/dev/nvme0n1 rootfstype=ext4 ro init=/.kiln/init",
			Root{Device: "/dev/nvme0n1", FSType: "ext4", Flags: unix.MS_RDONLY, Init: "/.kiln/init"}, ""},
		{"root=/dev/vda rw rootfstype=xfs rootflags=noatime",
			Root{Device: "/dev/vda", FSType: "xfs", Data: "noatime", Init: "/sbin/init"}, ""},
		{"root=/dev/vda rw ro", Root{Device: "/dev/vda", FSType: "ext4", Flags: unix.MS_RDONLY, Init: "/sbin/init"}, ""},
		{"root=/dev/vda ro rw", Root{Device: "/dev/vda", FSType: "ext4", Init: "/sbin/init"}, ""},
		{"console=ttyS0", Root{}, "no root="},
		{"root=UUID=1234", Root{}, "only /dev paths"},
		{"root=/dev/vda init=sbin/init", Root{}, "not an absolute path"},
	} {
		got, err := RootFromCmdline(cmdline.Parse(tc.cmdline))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one containing %q", tc.cmdline, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: %+v, %v; want %+v", tc.cmdline, got, err, tc.want)
		}
	}
}

func TestRemoveTree(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"init", "kiln-initramfs", "lib/modules/6.1/kernel/fs/overlay.ko", "dev/console"} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/nowhere", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	removeTree(dir, st.Dev)
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("left %v", entries)
	}
}
