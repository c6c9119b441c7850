package overlayroot

import (
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

func TestFromCmdline(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    Spec
		err     string
	}{
		{"console=ttyS0 root=/dev/vda ro", Spec{}, ""},
		{"kiln.overlay=off", Spec{Off: true}, ""},
		{"kiln.overlay=/dev/vdb", Spec{Device: "/dev/vdb"}, ""},
		{"kiln.overlay=/dev/nvme1n1", Spec{Device: "/dev/nvme1n1"}, ""},
		{"kiln.overlay=/dev/vdb kiln.overlay=LABEL=data", Spec{Label: "data"}, ""},
		{`kiln.overlay="LABEL=my scratch"`, Spec{Label: "my scratch"}, ""},
		{"kiln.overlay", Spec{}, "want a device"},
		{"kiln.overlay=vdb", Spec{}, "want a device"},
		{"kiln.overlay=/dev/", Spec{}, "not a device path"},
		{"kiln.overlay=/dev/../etc/passwd", Spec{}, "not a device path"},
		{"kiln.overlay=LABEL=", Spec{}, "1 to 16 bytes"},
		{"kiln.overlay=LABEL=seventeen-bytes!!", Spec{}, "1 to 16 bytes"},
	} {
		got, err := FromCmdline(cmdline.Parse(tc.cmdline))
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

// superblock returns the first 2 KiB of an ext4 filesystem labelled label.
func superblock(label string) []byte {
	b := make([]byte, 2048)
	binary.LittleEndian.PutUint16(b[superblockOffset+magicOffset:], extMagic)
	copy(b[superblockOffset+labelOffset:], label)
	return b
}

func TestReadLabel(t *testing.T) {
	for _, tc := range []struct {
		name  string
		data  []byte
		label string
		ok    bool
	}{
		{"labelled", superblock("kiln-scratch"), "kiln-scratch", true},
		{"full-length label", superblock("0123456789abcdef"), "0123456789abcdef", true},
		{"no label", superblock(""), "", true},
		{"not ext4", make([]byte, 4096), "", false},
		{"too small", []byte("tiny"), "", false},
	} {
		label, ok, err := ReadLabel(strings.NewReader(string(tc.data)))
		if err != nil || label != tc.label || ok != tc.ok {
			t.Errorf("%s: %q, %v, %v; want %q, %v", tc.name, label, ok, err, tc.label, tc.ok)
		}
	}
}

// TestReadLabelMkfs reads what mkfs.ext4 writes.
func TestReadLabelMkfs(t *testing.T) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		if mkfs, err = exec.LookPath("/usr/sbin/mkfs.ext4"); err != nil {
			t.Skip("mkfs.ext4 not installed")
		}
	}
	img := filepath.Join(t.TempDir(), "scratch.ext4")
	if out, err := exec.Command(mkfs, "-q", "-L", "kiln-scratch", img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	label, ok, err := readDeviceLabel(img)
	if err != nil || !ok || label != "kiln-scratch" {
		t.Errorf("readDeviceLabel = %q, %v, %v", label, ok, err)
	}
}

// fakeDevices lays out a sysfs with block devices and a /dev whose device
// nodes are files holding a superblock, as locate reads them.
type fakeDevices struct {
	t        *testing.T
	sys, dev string
}

func newFakeDevices(t *testing.T) *fakeDevices {
	dir := t.TempDir()
	f := &fakeDevices{t: t, sys: filepath.Join(dir, "sys"), dev: filepath.Join(dir, "dev")}
	for _, d := range []string{filepath.Join(f.sys, "class", "block"), f.dev} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// add adds a block device numbered 259:minor whose content is data; nil
// data leaves its node out of /dev.
func (f *fakeDevices) add(name string, minor uint32, data []byte) uint64 {
	f.t.Helper()
	sysName := strings.ReplaceAll(name, "/", "!")
	dir := filepath.Join(f.sys, "class", "block", sysName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dev"), []byte("259:"+strconv.Itoa(int(minor))+"\n"), 0o644); err != nil {
		f.t.Fatal(err)
	}
	if data != nil {
		node := filepath.Join(f.dev, name)
		if err := os.MkdirAll(filepath.Dir(node), 0o755); err != nil {
			f.t.Fatal(err)
		}
		if err := os.WriteFile(node, data, 0o644); err != nil {
			f.t.Fatal(err)
		}
	}
	return unix.Mkdev(259, minor)
}

func TestLocate(t *testing.T) {
	f := newFakeDevices(t)
	root := f.add("nvme0n1", 0, superblock("kiln-scratch")) // never chosen
	f.add("nvme1n1", 1, make([]byte, 4096))                 // not ext4
	f.add("nvme2n1", 2, superblock("data"))
	f.add("nvme3n1", 3, superblock("kiln-scratch"))
	f.add("cciss/c0d0", 4, superblock("other"))
	f.add("vdz", 5, nil) // listed, but no node yet

	for _, tc := range []struct {
		name string
		spec Spec
		want string
		err  string
	}{
		{"discovered by label", Spec{}, "/dev/nvme3n1", ""},
		{"named label", Spec{Label: "data"}, "/dev/nvme2n1", ""},
		{"named device", Spec{Device: "/dev/nvme1n1"}, "/dev/nvme1n1", ""},
		{"device with a slash", Spec{Device: "/dev/cciss/c0d0"}, "/dev/cciss/c0d0", ""},
		{"the root device", Spec{Device: "/dev/nvme0n1"}, "", "is the root device"},
		{"missing device", Spec{Device: "/dev/vdb"}, "", "not found"},
		{"device without a node", Spec{Device: "/dev/vdz"}, "", "not found"},
		{"missing label", Spec{Label: "nope"}, "", "not found"},
	} {
		d, err := locate(tc.spec, f.sys, f.dev, root)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %v, %v; want an error containing %q", tc.name, d, err, tc.err)
			}
			if tc.err == "not found" && !errors.Is(err, errNotFound) {
				t.Errorf("%s: error %v is not errNotFound", tc.name, err)
			}
		case err != nil || d.path() != tc.want:
			t.Errorf("%s: %q, %v; want %q", tc.name, d.path(), err, tc.want)
		}
	}

	devs, err := blockDevices(f.sys)
	if err != nil {
		t.Fatal(err)
	}
	if got := deviceName(devs, root); got != "/dev/nvme0n1" {
		t.Errorf("deviceName(root) = %q", got)
	}

	// Two scratch disks: the user must choose.
	f.add("vdc", 6, superblock("kiln-scratch"))
	if _, err := locate(Spec{}, f.sys, f.dev, root); err == nil || !strings.Contains(err.Error(), "/dev/nvme3n1 and /dev/vdc") {
		t.Errorf("two scratch disks: %v, want an error naming both", err)
	}
}
